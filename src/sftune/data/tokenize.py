"""Turn a file of records into one file-order token stream: render, encode, delimit, mask.

This is the hot path of building a packed dataset, so it stays close to the tokenizer's Rust
backend: records are rendered and encoded `DOCS_PER_BATCH` at a time, and only one batch's
Python token lists exist at once; everything else is numpy (`_pack_chunk`).

Each document ends with exactly one EOS, which is trained:

* prompt/response and Alpaca records (the CS336 rule): `tokenizer(text)` (its post-processor
  adds the BOS where the model has one), then `tokenizer.eos_token_id` appended;
* chat records whose rendered text already ends with the EOS token's text (ChatML templates
  end each turn with `<|im_end|>`, SmolLM2's EOS), optionally followed by whitespace: the text
  is cut right after that EOS and nothing is appended, so the end-of-turn token is not trained
  twice. A chat template that ends otherwise gets the EOS appended like any other document.

With `response_only`, the label mask marks the tokens that start at or after the response's
first character (character offsets from the fast tokenizer), plus the final EOS.

    >>> tokens, doc_lengths, mask = build_stream(tok, Path("train.jsonl"))  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sftune.data.formats import Record, iter_records
from sftune.data.templates import render_record
from sftune.errors import DataError, SftuneError

DOCS_PER_BATCH = 2048  # documents tokenized per call: big enough for the Rust thread pool


class Rendered(NamedTuple):
    """A batch of rendered documents: texts, where each response starts, which end in EOS."""

    texts: list[str]
    response_starts: list[int]
    ends_with_eos: list[bool]


def build_stream(
    tokenizer: Any,
    path: Path,
    fields: Mapping[str, str] | None = None,
    response_only: bool = False,
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
    """Tokenize `path` batch by batch: (token chunks, document lengths, mask chunks or None).

    Only one batch of records and its Python token lists exist at a time; everything else
    is numpy.
    """
    encoder = DocumentEncoder(tokenizer, response_only)
    token_chunks: list[np.ndarray] = []
    mask_chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for records in _batched(iter_records(path, fields), DOCS_PER_BATCH):
        rendered = render_batch(path, records, tokenizer)
        tokens, doc_lengths, mask = encoder.encode(*rendered)
        token_chunks.append(tokens)
        lengths.append(doc_lengths)
        if mask is not None:
            mask_chunks.append(mask)
    return token_chunks, np.concatenate(lengths), mask_chunks if response_only else None


def _batched(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def render_batch(path: Path, records: list[Record], tokenizer: Any) -> Rendered:
    """Render records to texts (chats cut after a final EOS, see the module doc)."""
    eos_text = getattr(tokenizer, "eos_token", None)
    out = Rendered([], [], [])
    for record in records:
        try:
            prompt_part, text = render_record(record, tokenizer)
        except ValueError as e:
            raise DataError(path, str(e), line=record.line) from None
        ends = False
        if record.messages is not None and eos_text:
            text, ends = cut_after_final_eos(text, eos_text, len(prompt_part))
        out.texts.append(text)
        out.response_starts.append(len(prompt_part))
        out.ends_with_eos.append(ends)
    return out


def cut_after_final_eos(text: str, eos_text: str, response_start: int) -> tuple[str, bool]:
    """`text` cut right after a final `eos_text` (trailing whitespace dropped), and whether it was.

    Only an EOS inside the response counts: the prompt part is never cut.

        >>> cut_after_final_eos("<|im_start|>assistant\\nyo<|im_end|>\\n", "<|im_end|>", 23)
        ('<|im_start|>assistant\\nyo<|im_end|>', True)
        >>> cut_after_final_eos("### Response:\\nyo", "<|im_end|>", 14)
        ('### Response:\\nyo', False)
    """
    stripped = text.rstrip()
    if stripped.endswith(eos_text) and len(stripped) - len(eos_text) >= response_start:
        return stripped, True
    return text, False


class DocumentEncoder:
    """Encode rendered documents to one int32 array ending each with one EOS, as `tokenizer(text)`.

    With a fast tokenizer the Rust backend is called directly (`encode_batch_fast`, no offsets,
    unless response-only masking needs them), which skips building Python lists for the
    attention mask; the first batch is checked against `tokenizer(texts)` and the encoder
    falls back to it on any difference.

        >>> enc = DocumentEncoder(tok, response_only=False)  # doctest: +SKIP
        >>> enc.encode(["Hi", "Yo"], [0, 0])  # doctest: +SKIP
        (array([128000, 13347, 128001, 128000, 65825, 128001], dtype=int32), array([3, 3]), None)
    """

    def __init__(self, tokenizer: Any, response_only: bool):
        self.tokenizer = tokenizer
        self.response_only = response_only
        self.eos = int(tokenizer.eos_token_id)
        self.use_backend: bool | None = None  # decided on the first batch
        if response_only and not getattr(tokenizer, "is_fast", False):
            raise SftuneError("response_only needs a fast tokenizer (for character offsets)")

    def encode(
        self,
        texts: list[str],
        response_starts: list[int],
        ends_with_eos: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens with one EOS ending each document, document lengths, label mask or None).

        `ends_with_eos[j]`: text j already ends with the EOS token's text, so no EOS is added
        (unless its last token turns out not to be the EOS id).
        """
        if self.use_backend is None:
            self.use_backend = self._backend_agrees(texts[:8])
        if self.use_backend:
            ids, prompt_lengths = self._encode_backend(texts, response_starts)
        else:
            ids, prompt_lengths = self._encode_python(texts, response_starts)
        if ends_with_eos is None:
            append = np.ones(len(ids), dtype=bool)
        else:
            last = [doc[-1] if doc else None for doc in ids]
            append = np.array(
                [not (e and t == self.eos) for e, t in zip(ends_with_eos, last, strict=True)],
                dtype=bool,
            )
        return _pack_chunk(ids, prompt_lengths, self.eos, append)

    def _backend_agrees(self, sample: list[str]) -> bool:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return False
        # Calling the tokenizer first also resets any truncation/padding left on the backend.
        expected = self.tokenizer(sample)["input_ids"]
        if backend.truncation is not None or backend.padding is not None:
            return False
        return [e.ids for e in backend.encode_batch(sample)] == expected

    def _encode_backend(
        self, texts: list[str], starts: list[int]
    ) -> tuple[list[list[int]], list[int] | None]:
        backend = self.tokenizer.backend_tokenizer
        if not self.response_only:
            fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in fast(texts)], None
        encodings = backend.encode_batch(texts)
        return [e.ids for e in encodings], [
            _prompt_length(e, start) for e, start in zip(encodings, starts, strict=True)
        ]

    def _encode_python(
        self, texts: list[str], starts: list[int]
    ) -> tuple[list[list[int]], list[int] | None]:
        if not self.response_only:
            return self.tokenizer(texts)["input_ids"], None
        enc = self.tokenizer(texts, return_offsets_mapping=True)
        return enc["input_ids"], [
            _prompt_length_from_offsets(offsets, start)
            for offsets, start in zip(enc["offset_mapping"], starts, strict=True)
        ]


def _prompt_length(encoding: Any, response_start: int) -> int:
    """Tokens before the response: those that start before character `response_start`."""
    token = encoding.char_to_token(response_start)
    if token is None:  # empty response: every token is prompt
        return len(encoding.ids)
    # A token straddling the boundary starts in the prompt, so it counts as prompt.
    return token + 1 if encoding.token_to_chars(token)[0] < response_start else token


def _prompt_length_from_offsets(offsets: Sequence[tuple[int, int]], response_start: int) -> int:
    """As `_prompt_length`, from an offsets list; zero-width special tokens do not end the prompt."""
    return next(
        (i for i, (lo, hi) in enumerate(offsets) if lo >= response_start and hi > lo),
        len(offsets),
    )


def _pack_chunk(
    ids: list[list[int]], prompt_lengths: list[int] | None, eos: int, append_eos: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flatten token lists into int32, insert EOS after the documents flagged in `append_eos`,
    build the label mask (every token from the response's first one on, the final EOS included).
    """
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    tokens = np.insert(flat, np.cumsum(lengths)[append_eos], eos)
    lengths += append_eos  # the appended EOS
    if prompt_lengths is None:
        return tokens, lengths, None
    doc_starts = np.cumsum(lengths) - lengths
    position = np.arange(len(tokens)) - np.repeat(doc_starts, lengths)
    mask = position >= np.repeat(np.asarray(prompt_lengths, dtype=np.int64), lengths)
    return tokens, lengths, mask
