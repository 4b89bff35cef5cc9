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

Every problem raises `DataError` naming the file, the line and the field. A path that is not a
regular file (a directory, /dev/null, a FIFO) is refused before it is opened, and a record whose
JSON text is over `MAX_RECORD_BYTES` (8 MiB) is refused before it is parsed.

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
import re
import stat
import sys
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
# The most one record may take as JSON text: its JSON Lines line, or, in a `.json` list, the item
# written compactly in UTF-8. 8 MiB is about 2 million tokens of English, twice a 1M-token
# context. The tokenizer needs some 200 bytes of memory per byte of one text: a record of 8 MiB
# tokenizes in about 12 s with 1.6 GB on one CPU core, one of 50 MB took 193 s and 7.6 GB. The
# bound also stops reading a "line" that never ends (a binary file, a `.json` named `.jsonl`).
MAX_RECORD_BYTES = 8 * 1024 * 1024
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
    for record, _ in iter_sourced_records(path, fields, system_prompt):
        yield record


def iter_sourced_records(
    path: str | Path,
    fields: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    *,
    need_response: bool = True,
) -> Iterator[tuple[Record, dict[str, Any]]]:
    """`iter_records`, each record with the JSON object it was read from (`sftune generate
    --data` keeps the source's other fields, e.g. GSM8K's `answer`). Without `need_response`,
    a record may lack its response (`output`): a file of prompts to answer."""
    path = data_file(path)
    parse = shape = None
    count = 0
    for line_no, obj in _iter_objects(path):
        if parse is None:
            parse, shape = _parser_for(path, line_no, obj, fields, system_prompt, need_response)
            first_line = line_no
        elif not fields:
            _check_same_shape(path, line_no, obj, shape, first_line)
        yield parse(obj, line_no), obj
        count += 1
    if count == 0:
        raise _no_records(path)


def peek(path: str | Path, fields: Mapping[str, str] | None = None) -> str:
    """The record format of `path` (`prompt/response`, `alpaca`, `messages` or `sharegpt`; see
    `FORMAT_NAMES`), from its first record, which is validated exactly as `iter_records` would
    (same `DataError`s).

    A JSON Lines file is read only up to its first record; a `.json` list is parsed whole.
    """
    path = data_file(path)
    for line_no, obj in _iter_objects(path):
        parse, shape = _parser_for(path, line_no, obj, fields, None)
        parse(obj, line_no)
        return shape
    raise _no_records(path)


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def data_file(path: str | Path) -> Path:
    """`path` as a Path, if it is a regular file (or a link to one); else a `DataError` saying
    what it is. Only `stat` is called: opening a FIFO to look would block until a writer comes.

        >>> data_file("/dev/null")  # doctest: +SKIP
        DataError: /dev/null: is not a regular file (a character device): give a .jsonl, ...
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise DataError(path, f"no such file{broken}") from None
    except OSError as e:  # a permission denied on a folder above it, a loop of links, ...
        raise DataError(path, f"cannot read ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise DataError(path, f"is a directory, not a data file: {_WANTED}")
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
    raise DataError(path, f"is not a regular file ({kind}): {_WANTED}")


_WANTED = "give a .jsonl, .jsonl.gz or .json file of records"


def iter_objects(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line, parsed JSON) of each record of a `.jsonl`, `.jsonl.gz` or `.json` file, with every
    check above (`data_file`, `MAX_RECORD_BYTES`, UTF-8, depth): the reader of other record
    kinds (`preference.py`), which validate the objects themselves."""
    return _iter_objects(data_file(path))


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
            # readline with a bound: a line longer than any record is never held whole.
            while raw := f.readline(MAX_RECORD_BYTES + 2):
                line_no += 1
                if _line_bytes(raw) > MAX_RECORD_BYTES:
                    raise _too_large(path, _rest_of_line(f, len(raw), raw), line_no, _NOT_JSONL)
                if raw.isspace():
                    continue
                yield line_no, _parse_line(path, line_no, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated or corrupt gzip stream: report where reading stopped.
        raise DataError(path, f"corrupt or truncated gzip data ({e})", line=line_no + 1) from None
    except OSError as e:  # unreadable (permissions), an I/O error
        raise DataError(path, f"cannot read ({e.strerror or e})", line=line_no or None) from None


def _line_bytes(raw: bytes) -> int:
    """The length of a line without its end (LF or CRLF)."""
    if raw.endswith(b"\n"):
        return len(raw) - 1 - raw.endswith(b"\r\n")
    return len(raw)


def _rest_of_line(f: Any, size: int, raw: bytes) -> int:
    """The byte length of a too-long line, read on in 1 MiB pieces up to 64 times the limit."""
    while not raw.endswith(b"\n") and size <= 64 * MAX_RECORD_BYTES:
        raw = f.readline(1 << 20)
        if not raw:
            break
        size += len(raw)
    return size - len(raw) + _line_bytes(raw)


_NOT_JSONL = " (or, if this file is not JSON Lines at all, give the right one)"


def _too_large(path: Path, size: int, line: int, hint: str = "") -> DataError:
    at_least = "at least " if size > 64 * MAX_RECORD_BYTES else ""  # not read to its end
    return DataError(
        path,
        f"this record is {at_least}{_size(size)} of JSON, over the limit of "
        f"{_size(MAX_RECORD_BYTES)} per record (MAX_RECORD_BYTES in sftune/data/formats.py): "
        f"split it into smaller records{hint}",
        line=line,
    )


def _size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} bytes"


def _parse_line(path: Path, line_no: int, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = f"not valid UTF-8 (byte {e.start}){_gzip_hint(raw, line_no)}"
        raise DataError(path, problem, line=line_no) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=line_no) from None
    except RecursionError:
        raise DataError(path, _too_deep(), line=line_no) from None
    if _SURROGATE.search(raw):
        _json_bytes(path, obj, line_no)
    return obj


# A \\uD800-\\uDFFF escape: half of a UTF-16 pair, which json.loads lets through alone.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_deep() -> str:
    # The JSON decoder recurses once per level, against Python's recursion limit.
    return f"JSON nested too deeply (arrays or objects over about {sys.getrecursionlimit()} deep)"


def _gzip_hint(data: bytes, line_no: int) -> str:
    if line_no == 1 and data.startswith(b"\x1f\x8b"):
        return ": this is gzip data; a gzip file must be named .gz (e.g. train.jsonl.gz)"
    return ""


def _iter_json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """Items of a `.json` file holding one list; the item's 1-based index stands in for a line."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise DataError(path, f"cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not valid UTF-8 (byte {e.start}){_gzip_hint(raw, 1)}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    except RecursionError:
        raise DataError(path, _too_deep()) from None
    if not isinstance(data, list):
        raise DataError(
            path, f"a .json file must hold a list of records, not {type(data).__name__}"
        )
    # No item of a smaller file can be over the limit; only an escape makes a lone surrogate.
    check = len(raw) > MAX_RECORD_BYTES or _SURROGATE.search(raw) is not None
    del raw
    for index, item in enumerate(data, start=1):
        if check and (size := _json_bytes(path, item, index)) > MAX_RECORD_BYTES:
            raise _too_large(path, size, index)
        yield index, item


def _json_bytes(path: Path, item: Any, line: int) -> int:
    """The size of `item` as one JSON Lines line; a `DataError` for a lone surrogate (no
    tokenizer takes one: it is no character)."""
    try:
        return len(json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode())
    except RecursionError:
        raise DataError(path, _too_deep(), line=line) from None
    except UnicodeEncodeError as e:
        code = ord(e.object[e.start])
        problem = f"\\u{code:04x} is half of a UTF-16 surrogate pair, alone: not a character"
        raise DataError(path, problem, line=line) from None


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
    need_response: bool = True,
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
        return (lambda obj, line: _alpaca_record(path, obj, line, need_response)), shape
    p_key, r_key = fields.get("prompt", "prompt"), fields.get("response", "response")
    return (
        lambda obj, line: Record(
            _string(path, obj, line, p_key),
            _string(path, obj, line, r_key, need_response),
            None,
            line,
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


def _alpaca_record(path: Path, obj: Any, line: int, need_output: bool = True) -> Record:
    instruction = _string(path, obj, line, "instruction")
    extra = _string(path, obj, line, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record(prompt, _string(path, obj, line, "output", need_output), None, line)


def _chat_record(path: Path, obj: Any, line: int, key: str, system_prompt: str | None) -> Record:
    """A chat: OpenAI messages or ShareGPT conversations, normalised by `chat.parse_chat`."""
    if not isinstance(obj, dict):
        raise DataError(path, f"a record must be a JSON object, not {_kind(obj)}", line=line)
    if key not in obj:
        raise DataError(path, "missing", line=line, field=key)
    chat: Chat = parse_chat(path, obj[key], obj.get("tools"), line=line, key=key)
    chat = with_system_prompt(chat, system_prompt)
    return Record("", "", chat.messages, line, chat.tools, chat.train)


def parse_fields(
    text: str | None, ours: tuple[str, ...] = CANONICAL_FIELDS
) -> dict[str, str] | None:
    """`question=prompt,answer=response` -> {"prompt": "question", "response": "answer"}.

    Each pair names one of `ours` (for SFT: prompt, response, messages; for preference pairs:
    prompt, chosen, rejected) on either side; the other side is the file's key.

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
        if right in ours:
            mapping[right] = left
        elif left in ours:
            mapping[left] = right
        else:
            raise ConfigError(f"--fields: {pair!r} names none of our fields {', '.join(ours)}")
    return mapping
