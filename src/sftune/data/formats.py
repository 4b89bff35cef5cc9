"""Read SFT records from JSON Lines (plain or gzip) or a JSON list, validated with line numbers.

Four record shapes are recognised from the first record, or forced with a field mapping:

    {"prompt": "What is 2+2?", "response": "4"}                     prompt/response (default)
    {"instruction": "Add.", "input": "2+2", "output": "4"}          Alpaca
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]}            OpenAI messages
    {"conversations": [{"from": "human", "value": "2+2?"},
                       {"from": "gpt", "value": "4"}]}               ShareGPT conversations

Chats (the last two, read by `chat.py`: tool calls, a record-level `tools` list, per-turn
`"train": false`) are rendered by the tokenizer's chat template. Every record of a file must
have the first record's shape: a file that mixes them is an error naming the first line that
differs.

For Alpaca records the prompt is `instruction + "\\n\\n" + input` when `input` is non-empty,
and just `instruction` otherwise (the choice of Stanford Alpaca's own "with input" prompt,
folded into our single `{prompt}` slot).

Anything else is read through a mapping from our names to the file's names, e.g. GSM8K:

    >>> recs = read_records("gsm8k/train.jsonl", fields={"prompt": "question", "response": "answer"})  # doctest: +SKIP
    >>> recs[0].prompt[:16], recs[0].line  # doctest: +SKIP
    ('Natalia sold cli', 1)

Every problem raises `DataError` naming the file, the line and the field.

Standard library only (like `sftune.errors` and `sftune.paths`), so the CLI can check a data
file before it pays for importing torch: `peek` reads and validates just the first record.

    >>> peek("train.jsonl")  # doctest: +SKIP
    'prompt/response'
    >>> FORMAT_NAMES[peek("chats.jsonl")]  # doctest: +SKIP
    'ShareGPT conversations'
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from sftune.data.chat import Chat, parse_chat, with_system_prompt
from sftune.errors import ConfigError, DataError

PROMPT_RESPONSE = "prompt/response"
ALPACA = "alpaca"
MESSAGES = "messages"  # OpenAI
SHAREGPT = "sharegpt"
CHAT_FORMATS = (MESSAGES, SHAREGPT)
FORMAT_NAMES = {
    PROMPT_RESPONSE: "prompt/response",
    ALPACA: "Alpaca",
    MESSAGES: "OpenAI messages",
    SHAREGPT: "ShareGPT conversations",
}
CANONICAL_FIELDS = ("prompt", "response", "messages")
_CHAT_KEYS = {MESSAGES: "messages", SHAREGPT: "conversations"}


class Record(NamedTuple):
    """One training example. `messages` is set (and prompt/response are empty) for chat records.

    `line` is the 1-based line in the file (the record's index for a `.json` list), for errors.
    Chats also carry the record's `tools` (or None) and `train`, each message's training flag
    (None: as `--train-on` decides; see `chat.py`).
    """

    prompt: str
    response: str
    messages: tuple[dict[str, Any], ...] | None = None
    line: int = 0
    tools: tuple[dict[str, Any], ...] | None = None
    train: tuple[bool | None, ...] | None = None


def read_records(
    path: str | Path, fields: Mapping[str, str] | None = None, system_prompt: str | None = None
) -> list[Record]:
    """All records of `path` as a list (see `iter_records` for the streaming form)."""
    return list(iter_records(path, fields, system_prompt))


def iter_records(
    path: str | Path, fields: Mapping[str, str] | None = None, system_prompt: str | None = None
) -> Iterator[Record]:
    """Yield the records of `path` one by one, so a large file is never held in memory.

    `fields` maps our names (`prompt`, `response` or `messages`) to the file's keys. Without
    it, the shape is detected from the first record, and a later record of another shape is
    an error. `system_prompt` becomes the first message of every chat that has no system
    message. Raises `DataError` for a missing or empty file and for any bad line (the records
    before it have been yielded already).
    """
    path = _existing(path)
    parse = shape = None
    count = 0
    for line_no, obj in _iter_objects(path):
        if parse is None:
            parse, shape = _parser_for(path, line_no, obj, fields, system_prompt)
            first_line = line_no
        elif not fields:
            _check_same_shape(path, line_no, obj, shape, first_line)
        yield parse(obj, line_no)
        count += 1
    if count == 0:
        raise _no_records(path)


def peek(path: str | Path, fields: Mapping[str, str] | None = None) -> str:
    """The record format of `path` (`prompt/response`, `alpaca`, `messages` or `sharegpt`; see
    `FORMAT_NAMES`), from its first record, which is validated exactly as `iter_records` would
    (same `DataError`s).

    A JSON Lines file is read only up to its first record; a `.json` list is parsed whole.
    """
    path = _existing(path)
    for line_no, obj in _iter_objects(path):
        parse, shape = _parser_for(path, line_no, obj, fields, None)
        parse(obj, line_no)
        return shape
    raise _no_records(path)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    return path


def _no_records(path: Path) -> DataError:
    return DataError(path, "no records (the file is empty or has only blank lines)")


def _iter_objects(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line, or each item of a `.json` list."""
    if path.suffix == ".json":
        yield from _iter_json_list(path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):  # noqa: B007 (line_no is read in except)
                if raw.isspace():
                    continue
                yield line_no, _parse_line(path, line_no, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated or corrupt gzip stream: report where reading stopped.
        raise DataError(path, f"corrupt or truncated gzip data ({e})", line=line_no + 1) from None


def _parse_line(path: Path, line_no: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 (byte {e.start})", line=line_no) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=line_no) from None


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """Items of a `.json` file holding one list; the item's 1-based index stands in for a line."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    if not isinstance(data, list):
        raise DataError(
            path, f"a .json file must hold a list of records, not {type(data).__name__}"
        )
    yield from enumerate(data, start=1)


def detect_format(obj: Any, fields: Mapping[str, str] | None = None) -> str:
    """The record shape: `fields` decides if given, else the keys of the first record."""
    keys = set(fields) if fields else set(obj) if isinstance(obj, dict) else set()
    if "messages" in keys:
        return MESSAGES
    if not fields and "conversations" in keys:
        return SHAREGPT
    if not fields and "prompt" not in keys and "response" not in keys and "instruction" in keys:
        return ALPACA
    return PROMPT_RESPONSE


_KNOWN_KEYS = {"prompt", "response", "instruction", "messages", "conversations"}


def _check_same_shape(path: Path, line_no: int, obj: Any, shape: str, first_line: int) -> None:
    """One shape per file: a record of another is named with the line that set the shape."""
    if not isinstance(obj, dict) or not _KNOWN_KEYS & set(obj):
        return  # not a record of any shape: the parser names what is missing
    other = detect_format(obj)
    if other != shape:
        raise DataError(
            path,
            f"this record is {FORMAT_NAMES[other]}, but the file's first record (line "
            f"{first_line}) is {FORMAT_NAMES[shape]}: one format per file",
            line=line_no,
        )


def _parser_for(
    path: Path,
    line_no: int,
    first: Any,
    fields: Mapping[str, str] | None,
    system_prompt: str | None,
) -> tuple[Callable[[Any, int], Record], str]:
    """(a function (obj, line) -> Record, the shape's name) for the shape of the first record."""
    fields = _check_fields(path, fields)
    if not isinstance(first, dict):
        raise DataError(path, f"a record must be a JSON object, not {_kind(first)}", line=line_no)
    if not fields and not _KNOWN_KEYS & set(first):
        raise DataError(
            path,
            "cannot tell the record format: expected keys prompt/response, "
            "instruction/output, messages or conversations (or a field mapping)",
            line=line_no,
        )
    shape = detect_format(first, fields)
    fields = fields or {}
    if shape in CHAT_FORMATS:
        key = fields.get("messages", _CHAT_KEYS[shape])
        return (lambda obj, line: _chat_record(path, obj, line, key, system_prompt)), shape
    if shape == ALPACA:
        return (lambda obj, line: _alpaca_record(path, obj, line)), shape
    p_key, r_key = fields.get("prompt", "prompt"), fields.get("response", "response")
    return (
        lambda obj, line: Record(
            _string(path, obj, line, p_key), _string(path, obj, line, r_key), None, line
        )
    ), shape


def _check_fields(path: Path, fields: Mapping[str, str] | None) -> dict[str, str] | None:
    if not fields:
        return None
    unknown = set(fields) - set(CANONICAL_FIELDS)
    if unknown:
        raise DataError(path, f"unknown target field(s) {sorted(unknown)} in the field mapping")
    if "messages" not in fields and set(fields) != {"prompt", "response"}:
        fields = {"prompt": "prompt", "response": "response", **fields}
    return dict(fields)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(path: Path, obj: Any, line: int, key: str, required: bool = True) -> str:
    """obj[key] as a string, or a DataError naming the line and field."""
    if not isinstance(obj, dict):
        raise DataError(path, f"a record must be a JSON object, not {_kind(obj)}", line=line)
    value = obj.get(key)
    if value is None and key not in obj:
        if not required:
            return ""
        raise DataError(path, "missing", line=line, field=key)
    if not isinstance(value, str):
        raise DataError(path, f"must be a string, not {_kind(value)}", line=line, field=key)
    return value


def _alpaca_record(path: Path, obj: Any, line: int) -> Record:
    instruction = _string(path, obj, line, "instruction")
    extra = _string(path, obj, line, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record(prompt, _string(path, obj, line, "output"), None, line)


def _chat_record(path: Path, obj: Any, line: int, key: str, system_prompt: str | None) -> Record:
    """A chat: OpenAI messages or ShareGPT conversations, normalised by `chat.parse_chat`."""
    if not isinstance(obj, dict):
        raise DataError(path, f"a record must be a JSON object, not {_kind(obj)}", line=line)
    if key not in obj:
        raise DataError(path, "missing", line=line, field=key)
    chat: Chat = parse_chat(path, obj[key], obj.get("tools"), line=line, key=key)
    chat = with_system_prompt(chat, system_prompt)
    return Record("", "", chat.messages, line, chat.tools, chat.train)


def parse_fields(text: str | None) -> dict[str, str] | None:
    """`question=prompt,answer=response` -> {"prompt": "question", "response": "answer"}.

    Each pair names one of our fields (prompt, response, messages) on either side; the
    other side is the file's key.

        >>> parse_fields("question=prompt,answer=response")
        {'prompt': 'question', 'response': 'answer'}
    """
    if not text:
        return None
    mapping: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        left, sep, right = (s.strip() for s in pair.partition("="))
        if not sep or not left or not right:
            raise ConfigError(f"--fields: expected SOURCE=TARGET, got {pair!r}")
        if right in CANONICAL_FIELDS:
            mapping[right] = left
        elif left in CANONICAL_FIELDS:
            mapping[left] = right
        else:
            raise ConfigError(
                f"--fields: {pair!r} names none of our fields {', '.join(CANONICAL_FIELDS)}"
            )
    return mapping
