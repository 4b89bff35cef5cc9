"""Read preference pairs (a prompt, a chosen and a rejected response) for DPO and its family.

Three forms are recognised from the first record, and every record of a file must have it:

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}                      strings
    {"prompt": [{"role": "user", "content": "2+2?"}],                       conversational
     "chosen": [{"role": "assistant", "content": "4"}],                     (TRL's format)
     "rejected": [{"role": "assistant", "content": "5"}]}
    {"chosen": "\\n\\nHuman: 2+2?\\n\\nAssistant: 4",                           Anthropic HH
     "rejected": "\\n\\nHuman: 2+2?\\n\\nAssistant: 5"}

* Strings are rendered as SFT renders a prompt/response record (`render_pair`): the Alpaca
  template's prompt part, then the response; each response ends with one EOS.
* Conversational pairs are rendered by the tokenizer's chat template and the prefix rule SFT
  uses for chats. The prompt may also be left inside both
  responses (TRL's "implicit prompt": `chosen` and `rejected` whole conversations); it is then
  the messages before the final assistant turn, and they must be the same in both. A
  message's `"train"`/`"weight"` flag is read and checked but not used: the prompt is never
  trained and every assistant turn of a response is.
* Anthropic HH: the prompt is the longest shared prefix of the two texts that ends at a
  `"\\n\\nAssistant:"`; the responses are what follows. `single_turn=True` keeps only pairs
  with one Human turn (the course does this); they are rendered as strings, the Human text as
  the instruction. A multi-turn prompt is rendered the same way: the dialogue between the first
  `Human:` and the last `Assistant:` is the instruction.

A pair whose chosen equals its rejected teaches nothing: it is counted, skipped and reported in
`PairFile.summary()`; a file of nothing else is refused. Other problems raise a one-line
`DataError` naming the file, the line (a Parquet row's 1-based index) and the field: a missing
or empty `chosen`/`rejected`, a record of another form than the first, a prompt that differs
between chosen and rejected, SFT records given as pairs (`use --objective sft`), and, through
`check_not_pairs` for the SFT reader, pairs given as SFT records (`use --objective dpo`).

Files: JSON Lines, `.jsonl.gz` and `.json` lists through `formats.iter_objects` (its checks
and `MAX_RECORD_BYTES`), and Parquet (`.parquet`, what the hub serves preference sets in)
through pyarrow, imported only for a Parquet file (`pip install 'sftune[parquet]'`), read a
batch of rows at a time. `--fields` maps the file's keys, as for SFT:

    >>> pairs = read_pairs("hh.jsonl.gz", single_turn=True)  # doctest: +SKIP
    >>> pairs.form, pairs.summary()  # doctest: +SKIP
    ('hh', 'hh.jsonl.gz: 1,000 pairs (Anthropic HH); skipped 240 multi-turn (single_turn)')
    >>> read_pairs("p.parquet", fields=parse_pair_fields("question=prompt,good=chosen,bad=rejected"))  # doctest: +SKIP

`PairEncoder` turns a pair of any form into token ids with SFT's own machinery
(`templates.DocumentRenderer`, `tokenize.DocumentEncoder`): the prompt's ids once, and each
response's ids and trained mask, such that prompt + chosen is exactly SFT's document of that
prompt and response (for a chat: of the whole conversation, as the chat template renders it).

Standard library only at import (like `formats.py`), so the CLI can check a file before torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from sftune.data.chat import ASSISTANT, USER, parse_chat
from sftune.data.formats import (
    FORMAT_NAMES,
    MAX_RECORD_BYTES,
    _json_bytes,
    _kind,
    _too_large,
    data_file,
    detect_format,
    iter_objects,
    parse_fields,
)
from sftune.errors import ConfigError, DataError

STRINGS = "strings"
CONVERSATIONAL = "conversational"
HH = "hh"
PAIR_FORMAT_NAMES = {
    STRINGS: "prompt/chosen/rejected strings",
    CONVERSATIONAL: "conversational pairs",
    HH: "Anthropic HH",
}
PAIR_FIELDS = ("prompt", "chosen", "rejected")
HUMAN, ASSISTANT_MARK = "\n\nHuman:", "\n\nAssistant:"
PARQUET_ROWS = 1024  # rows converted to Python at a time
_SFT_KEYS = {"response", "instruction", "output", "messages", "conversations"}


class Pair(NamedTuple):
    """One preference pair. Strings and HH: three texts (HH's raw: prompt + chosen is the
    record's chosen text); conversational: three tuples of messages. `line`: for errors."""

    prompt: str | tuple[dict[str, Any], ...]
    chosen: str | tuple[dict[str, Any], ...]
    rejected: str | tuple[dict[str, Any], ...]
    line: int = 0
    tools: tuple[dict[str, Any], ...] | None = None
    form: str = STRINGS


class PairFile(NamedTuple):
    """The pairs of a file, its form, and what was skipped (see `summary`)."""

    path: str
    form: str
    pairs: list[Pair]
    identical: int  # chosen equal to rejected
    multi_turn: int  # HH with single_turn: more than one Human turn

    def summary(self) -> str:
        skipped = _skipped(self.identical, self.multi_turn)
        text = f"{self.path}: {len(self.pairs):,} pairs ({PAIR_FORMAT_NAMES[self.form]})"
        return text + (f"; skipped {skipped}" if skipped else "")


def _skipped(identical: int, multi_turn: int) -> str:
    counts = (
        (identical, "with chosen equal to rejected"),
        (multi_turn, "multi-turn (single_turn)"),
    )
    return ", ".join(f"{n:,} {why}" for n, why in counts if n)


def parse_pair_fields(text: str | None) -> dict[str, str] | None:
    """`--fields` for pairs: `question=prompt,good=chosen,bad=rejected` -> our name: file key."""
    return parse_fields(text, PAIR_FIELDS)


def read_pairs(
    path: str | Path, fields: Mapping[str, str] | None = None, single_turn: bool = False
) -> PairFile:
    """All usable pairs of `path`; `DataError` for any bad record (see the module doc).

    `fields` maps our names (prompt, chosen, rejected) to the file's keys. `single_turn` (HH
    only) skips pairs with more than one Human turn.
    """
    path = Path(path)
    keys = _keys(fields)
    form = first_line = None
    pairs: list[Pair] = []
    identical = multi_turn = 0
    for line, obj in _iter_rows(path):
        if form is None:
            form, first_line = pair_format(path, line, obj, keys), line
        else:
            _check_same_form(path, line, obj, keys, form, first_line)
        pair = _PARSERS[form](path, obj, line, keys)
        if pair.chosen == pair.rejected:
            identical += 1
        elif single_turn and form == HH and not _single_turn(pair):
            multi_turn += 1
        else:
            pairs.append(pair)
    if form is None:
        raise DataError(path, "no records (the file is empty or has only blank lines)")
    if not pairs:
        skipped = _skipped(identical, multi_turn)
        raise DataError(path, f"no usable pair: all {identical + multi_turn:,} skipped, {skipped}")
    return PairFile(str(path), form, pairs, identical, multi_turn)


def _keys(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Our names -> the file's keys."""
    unknown = set(fields or {}) - set(PAIR_FIELDS)
    if unknown:
        raise ConfigError(f"--fields: unknown target field(s) {sorted(unknown)} for pairs")
    return {name: (fields or {}).get(name, name) for name in PAIR_FIELDS}


def peek_pairs(path: str | Path, fields: Mapping[str, str] | None = None) -> str:
    """The pair form of `path` from its first record, validated as `read_pairs` would."""
    path = Path(path)
    keys = _keys(fields)
    for line, obj in _iter_rows(path):
        form = pair_format(path, line, obj, keys)
        _PARSERS[form](path, obj, line, keys)
        return form
    raise DataError(path, "no records (the file is empty or has only blank lines)")


def require_pairs(
    path: str | Path, fields: Mapping[str, str] | None = None, objective: str = "dpo"
) -> str:
    """The pair form of `path` (as `peek_pairs`), for a preference objective: a file of SFT
    records is refused in one line that says which objective needs what, and where to look.

    The message leads with the objective, not the file, because the file is fine for SFT;
    the `DataError` still carries `path` and `line` for callers that read them.
    """
    path = Path(path)
    keys = _keys(fields)
    for line, obj in _iter_rows(path):
        pair_keys = (
            keys["chosen"] in obj or keys["rejected"] in obj if isinstance(obj, dict) else True
        )
        if not pair_keys and _SFT_KEYS & set(obj):
            kind = FORMAT_NAMES[detect_format(obj)]
            error = DataError(path, f"looks like SFT data ({kind} records)", line=line)
            error.args = (
                f"`--objective {objective}` needs preference pairs (prompt/chosen/rejected): "
                f"{path}:{line} looks like SFT data ({kind} records); use --objective sft, "
                "or a file of pairs",
            )
            raise error
        break
    return peek_pairs(path, fields)


def pairs_at_lines(
    path: str | Path,
    lines: Iterable[int],
    fields: Mapping[str, str] | None = None,
) -> list[Pair]:
    """The pairs on `lines` of `path` (JSON Lines lines, Parquet rows), in file order: a few
    records re-read for display without parsing the rest of the file (it stops after the last)."""
    path = Path(path)
    keys = _keys(fields)
    wanted = set(lines)
    out: list[Pair] = []
    form = None
    for line, obj in _iter_rows(path):
        form = form or pair_format(path, line, obj, keys)
        if line in wanted:
            out.append(_PARSERS[form](path, obj, line, keys))
            if len(out) == len(wanted):
                break
    return out


def looks_like_pairs(path: str | Path) -> int | None:
    """The line of the first record of `path` when it is a preference pair (it has chosen or
    rejected and no SFT key), else None."""
    for line, obj in _iter_rows(Path(path)):
        if isinstance(obj, dict) and {"chosen", "rejected"} & set(obj) and not _SFT_KEYS & set(obj):
            return line
        return None
    return None


def check_not_pairs(path: str | Path) -> None:
    """For the SFT reader: a `DataError` if the first record of `path` is a preference pair."""
    line = looks_like_pairs(path)
    if line is not None:
        raise DataError(path, "this file holds preference pairs: use --objective dpo", line=line)


def pair_format(path: Path, line: int, obj: Any, keys: Mapping[str, str]) -> str:
    """The form of one record (`STRINGS`, `CONVERSATIONAL` or `HH`), from its keys and types."""
    if not isinstance(obj, dict):
        raise DataError(path, f"a record must be a JSON object, not {_kind(obj)}", line=line)
    p, c, r = keys["prompt"], keys["chosen"], keys["rejected"]
    if c not in obj and r not in obj:
        if _SFT_KEYS & set(obj):
            kind = FORMAT_NAMES[detect_format(obj)]
            raise DataError(path, f"this file holds {kind} records: use --objective sft", line=line)
        if p not in obj:
            raise DataError(
                path,
                f"cannot tell the pair format: expected keys {p}/{c}/{r}, or {c}/{r} "
                "(Anthropic HH), or a field mapping",
                line=line,
            )
    if p in obj:
        return CONVERSATIONAL if isinstance(obj[p], list) else STRINGS
    value = obj[c] if c in obj else obj[r]
    return CONVERSATIONAL if isinstance(value, list) else HH


def _check_same_form(path: Path, line: int, obj: Any, keys, form: str, first_line: int) -> None:
    if not isinstance(obj, dict) or (keys["chosen"] not in obj and keys["rejected"] not in obj):
        return  # not a pair of any form: the parser names what is missing
    other = pair_format(path, line, obj, keys)
    if other != form:
        raise DataError(
            path,
            f"this record is {PAIR_FORMAT_NAMES[other]}, but the file's first record (line "
            f"{first_line}) is {PAIR_FORMAT_NAMES[form]}: one format per file",
            line=line,
        )


# ---- reading rows -----------------------------------------------------------------------------


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        return _iter_parquet(data_file(path))
    return iter_objects(path)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row, row as a dict) of a Parquet file, `PARQUET_ROWS` rows converted at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            path, "reading Parquet needs pyarrow: pip install 'sftune[parquet]'"
        ) from None
    try:
        reader = pq.ParquetFile(path)
        row = 0
        for batch in reader.iter_batches(batch_size=PARQUET_ROWS):
            for obj in batch.to_pylist():
                row += 1
                # A row's size as JSON, the same bound as a JSON Lines line.
                if (size := _json_bytes(path, obj, row)) > MAX_RECORD_BYTES:
                    raise _too_large(path, size, row)
                yield row, _without_nulls(obj)
    except DataError:
        raise
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not Parquet, OSError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(path, f"cannot read as Parquet ({first})") from None


def _without_nulls(value: Any) -> Any:
    """A Parquet row with the null fields of its structs dropped: one struct type holds every
    key any message has, so a message without `train` reads back with `"train": None`."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---- the three forms --------------------------------------------------------------------------


def _text(path: Path, obj: dict, line: int, key: str) -> str:
    value = _required(path, obj, line, key)
    if not isinstance(value, str):
        raise DataError(path, f"must be a string, not {_kind(value)}", line=line, field=key)
    if not value.strip():
        raise DataError(path, "empty", line=line, field=key)
    return value


def _strings_pair(path: Path, obj: dict, line: int, keys) -> Pair:
    prompt = _required(path, obj, line, keys["prompt"])
    if not isinstance(prompt, str):
        raise DataError(
            path, f"must be a string, not {_kind(prompt)}", line=line, field=keys["prompt"]
        )
    chosen, rejected = (_text(path, obj, line, keys[k]) for k in ("chosen", "rejected"))
    return Pair(prompt, chosen, rejected, line)


def _required(path: Path, obj: dict, line: int, key: str) -> Any:
    if key not in obj or obj[key] is None:
        why = "missing (a pair needs a chosen and a rejected response)"
        raise DataError(path, why if key != "prompt" else "missing", line=line, field=key)
    return obj[key]


def _hh_pair(path: Path, obj: dict, line: int, keys) -> Pair:
    chosen, rejected = (_text(path, obj, line, keys[k]) for k in ("chosen", "rejected"))
    prompt = hh_prompt(chosen, rejected)
    if prompt is None:
        raise DataError(
            path,
            f"no shared prompt ending in {ASSISTANT_MARK!r}: not an Anthropic HH pair",
            line=line,
            field=keys["chosen"],
        )
    for key, text in ((keys["chosen"], chosen), (keys["rejected"], rejected)):
        if not text[len(prompt) :].strip():
            raise DataError(
                path, "empty (nothing after the last 'Assistant:')", line=line, field=key
            )
    return Pair(prompt, chosen[len(prompt) :], rejected[len(prompt) :], line, form=HH)


def hh_prompt(chosen: str, rejected: str) -> str | None:
    """The longest shared prefix of the two texts that ends at `"\\n\\nAssistant:"` (or None).

    >>> hh_prompt("\\n\\nHuman: hi\\n\\nAssistant: yo", "\\n\\nHuman: hi\\n\\nAssistant: no")
    '\\n\\nHuman: hi\\n\\nAssistant:'
    """
    n = len(os.path.commonprefix([chosen, rejected]))  # character by character, in C
    end = chosen.rfind(ASSISTANT_MARK, 0, n)  # the whole mark inside the shared prefix
    return None if end < 0 else chosen[: end + len(ASSISTANT_MARK)]


def _single_turn(pair: Pair) -> bool:
    """One Human turn: the prompt's, and none inside either response."""
    return pair.prompt.count(HUMAN) == 1 and HUMAN not in pair.chosen + pair.rejected


def hh_instruction(prompt: str) -> str:
    """The instruction HH's prompt is rendered with: the dialogue between the first `Human:`
    and the last `Assistant:` (a single-turn prompt: the Human's text), stripped."""
    text = prompt.removesuffix(ASSISTANT_MARK)
    text = text[len(HUMAN) :] if text.startswith(HUMAN) else text
    return text.strip()


def _conversational_pair(path: Path, obj: dict, line: int, keys) -> Pair:
    p, c, r = keys["prompt"], keys["chosen"], keys["rejected"]
    for key in (c, r):
        if not isinstance(_required(path, obj, line, key), list):
            raise DataError(
                path, f"must be a list of messages, not {_kind(obj[key])}", line=line, field=key
            )
        if not obj[key]:
            raise DataError(path, "empty", line=line, field=key)
    tools = obj.get("tools")
    if p in obj:
        prompt = parse_chat(path, obj[p], tools, line=line, key=p)
        responses = []
        for key in (
            c,
            r,
        ):  # checked as the whole conversation: message i counts from the prompt's first
            chat = parse_chat(path, [*obj[p], *obj[key]], tools, line=line, key=key)
            responses.append(_responses(path, chat.messages[len(prompt.messages) :], line, key))
        return Pair(prompt.messages, *responses, line, prompt.tools, CONVERSATIONAL)
    chats = [parse_chat(path, obj[key], tools, line=line, key=key) for key in (c, r)]
    prompts = [
        _implicit_prompt(path, chat.messages, line, key)
        for chat, key in zip(chats, (c, r), strict=True)
    ]
    if prompts[0] != prompts[1]:
        differ = next(
            (i for i, (a, b) in enumerate(zip(*prompts, strict=False)) if a != b),
            min(map(len, prompts)),
        )
        raise DataError(
            path,
            f"the prompt differs between chosen and rejected (message {differ}): a pair shares "
            "one prompt",
            line=line,
            field=r,
        )
    n = len(prompts[0])
    chosen, rejected = (chat.messages[n:] for chat in chats)
    return Pair(prompts[0], chosen, rejected, line, chats[0].tools, CONVERSATIONAL)


def _responses(path: Path, messages: tuple, line: int, key: str) -> tuple:
    if messages[-1]["role"] != ASSISTANT:
        raise DataError(path, "must end with an assistant message", line=line, field=key)
    return messages


def _implicit_prompt(path: Path, messages: tuple, line: int, key: str) -> tuple:
    """The messages before the final assistant turn (the response starts after the last user)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == USER), default=None)
    if last_user is None or messages[-1]["role"] != ASSISTANT:
        raise DataError(
            path, "must end with an assistant message after a user turn", line=line, field=key
        )
    return messages[: last_user + 1]


_PARSERS = {STRINGS: _strings_pair, CONVERSATIONAL: _conversational_pair, HH: _hh_pair}


# ---- rendering --------------------------------------------------------------------------------


def render_pair(pair: Pair, tokenizer: Any = None) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text), so that prompt + response is the text SFT
    renders for that prompt and response. No EOS is in the texts: as for SFT, the encoder
    appends `tokenizer.eos_token_id` once after each response (`tokenize.py`).

    Strings: the Alpaca template (`templates.render_alpaca`); HH: the same, with
    `hh_instruction(prompt)` and the stripped responses; conversational: the tokenizer's chat
    template (`templates.render_chat`, its BOS rule included; the responses then end with the
    template's end-of-turn text).

        >>> render_pair(Pair("Add 2 and 2.", "4", "5"))[1:]
        ('4', '5')
    """
    from sftune.data.templates import render_alpaca, render_chat

    if pair.form == CONVERSATIONAL and tokenizer is None:
        raise ValueError("a conversational pair is rendered by a tokenizer's chat template")
    if pair.form == HH:
        prompt_part, _ = render_alpaca(hh_instruction(pair.prompt), "")
        return prompt_part, pair.chosen.strip(), pair.rejected.strip()
    if pair.form == STRINGS:
        prompt_part, _ = render_alpaca(pair.prompt, "")
        return prompt_part, pair.chosen, pair.rejected
    # The prompt with the generation prompt, rendered from the prompt alone (an empty stand-in
    # answer): render_chat's own prompt part of a conversation ends before its LAST assistant
    # turn, which inside a multi-turn response is not where the response starts.
    stand_in = {"role": ASSISTANT, "content": ""}
    prompt_part, _ = render_chat([*pair.prompt, stand_in], tokenizer, pair.tools)
    texts = []
    for response in (pair.chosen, pair.rejected):
        _, full = render_chat([*pair.prompt, *response], tokenizer, pair.tools)
        if not full.startswith(prompt_part):
            raise ValueError("the chat template renders the prompt differently inside the pair")
        texts.append(full[len(prompt_part) :])
    return prompt_part, texts[0], texts[1]


class PairTokens(NamedTuple):
    """A pair as token ids: `prompt + chosen` (and `prompt + rejected`) is SFT's document.

    The masks (numpy bool, one per response token) mark the trained tokens: for strings and HH
    every response token and the EOS; for chats the assistant turns and the EOS, as SFT's
    `--train-on assistant` (not the whitespace a template writes after a special end-of-turn
    token). Each response ends with exactly one EOS.
    """

    prompt: list[int]
    chosen: list[int]
    chosen_mask: Any
    rejected: list[int]
    rejected_mask: Any


class PairEncodeError(ValueError):
    """A pair that cannot be encoded; `index` is its place in the batch (the caller names the
    file and line)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class PairEncoder:
    """Encode pairs of any form with SFT's renderer and encoder (`templates`, `tokenize`).

        >>> enc = PairEncoder(tok)  # doctest: +SKIP
        >>> t = enc.encode(pair)  # doctest: +SKIP
        >>> t.prompt + t.chosen == sft_document_tokens  # doctest: +SKIP
        >>> enc.encode_batch(pairs)  # the same, one tokenizer call per batch  # doctest: +SKIP

    The prompt is tokenized alone and must be the start of each whole document, so that one
    copy serves both responses. Where a string response's first characters merge with the
    prompt's last token (Llama 3 writes "\n\n" as one token, so a response starting with a
    newline), the response is tokenized on its own after the prompt's tokens instead (what TRL
    always does). For a chat the boundary is the template's assistant header; there `encode`
    raises ValueError (`PairEncodeError`, one line; the caller names the file and line) rather
    than guess.
    """

    def __init__(self, tokenizer: Any):
        from sftune.data.templates import DocumentRenderer
        from sftune.data.tokenize import DocumentEncoder

        self.tokenizer = tokenizer
        self.renderer = DocumentRenderer(tokenizer, "assistant")
        self.encoder = DocumentEncoder(tokenizer, masked=True)

    def encode(self, pair: Pair) -> PairTokens:
        return self.encode_batch([pair])[0]

    def encode_batch(self, pairs: list[Pair]) -> list[PairTokens]:
        """`encode` of each pair, with one tokenizer call for the prompts and one for the
        documents (short texts cost the Rust tokenizer mostly its per-call overhead)."""
        import numpy as np

        prompts, texts, spans, ends, eos_trained = [], [], [], [], []
        for i, pair in enumerate(pairs):
            try:
                prompt_part, *responses = render_pair(pair, self.tokenizer)
                docs = self._documents(pair, prompt_part, responses)
            except ValueError as e:
                raise PairEncodeError(i, str(e)) from None
            prompts.append(prompt_part)
            for doc in docs:
                for out, value in zip((texts, spans, ends, eos_trained), doc, strict=True):
                    out.append(value)
        prompt_ids = self.tokenizer(prompts)["input_ids"] if prompts else []
        tokens, lengths, mask = self.encoder.encode(texts, spans, ends, eos_trained)
        if mask is None:
            mask = np.ones(len(tokens), bool)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        out = []
        for i, pair in enumerate(pairs):
            ids = list(prompt_ids[i])
            parts: list[Any] = []
            for side in (0, 1):
                j = 2 * i + side
                doc = slice(offsets[j], offsets[j + 1])
                split = _after_prompt(tokens[doc], mask[doc], ids)
                if split is None and pair.form == CONVERSATIONAL:
                    raise PairEncodeError(
                        i,
                        "the chat template's prompt does not tokenize as the start of the "
                        "conversation (its last token merges with the response's first)",
                    )
                parts += split or self._alone(render_pair(pair, self.tokenizer)[1 + side])
            out.append(PairTokens(ids, *parts))
        return out

    def _documents(self, pair: Pair, prompt_part: str, responses: list[str]) -> list[tuple]:
        """(text, spans, ends_with_eos, eos_trained) of SFT's document of each response."""
        from sftune.data.formats import Record

        if pair.form != CONVERSATIONAL:
            # DocumentRenderer's Alpaca document, --train-on assistant
            return [
                (prompt_part + r, ((len(prompt_part), len(prompt_part + r)),), False, True)
                for r in responses
            ]
        docs = []
        for response in (pair.chosen, pair.rejected):
            # The prompt's turns are never trained; the responses' as --train-on assistant.
            train = (False,) * len(pair.prompt) + (None,) * len(response)
            messages = (*pair.prompt, *response)
            doc = self.renderer.render(Record("", "", messages, pair.line, pair.tools, train))
            docs.append((doc.text, doc.spans, doc.ends_with_eos, doc.eos_trained))
        return docs

    def _alone(self, response: str) -> list:
        import numpy as np

        ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        ids.append(int(self.tokenizer.eos_token_id))
        return [ids, np.ones(len(ids), bool)]


def _after_prompt(tokens: Any, mask: Any, prompt_ids: list[int]) -> list | None:
    """[response ids, mask] of a document after `prompt_ids`, or None when the document does
    not start with them (or trains one of them)."""
    n = len(prompt_ids)
    if tokens[:n].tolist() != prompt_ids or mask[:n].any():
        return None
    return [tokens[n:].tolist(), mask[n:].copy()]  # a copy: not a view pinning the batch's mask
