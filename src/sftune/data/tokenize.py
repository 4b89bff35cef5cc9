"""Turn a file of records into one file-order token stream: render, encode, delimit, mask.

This is the hot path of building a packed dataset, so it stays close to the tokenizer's Rust
backend: records are rendered and encoded `DOCS_PER_BATCH` at a time (fewer where they hold
over `BATCH_CHARS` characters: long reasoning traces), and only one batch's Python token lists
exist at once; everything else is numpy (`_pack_chunk`).

Each document ends with exactly one EOS:

* prompt/response and Alpaca records (the CS336 rule): `tokenizer(text)` (its post-processor
  adds the BOS where the model has one), then `tokenizer.eos_token_id` appended;
* chat records whose rendered text already ends with the EOS token's text (ChatML templates
  end each turn with `<|im_end|>`, SmolLM2's EOS), optionally followed by whitespace: the text
  is cut right after that EOS and nothing is appended, so the end-of-turn token is not doubled.
  A chat template that ends otherwise (Gemma's `<end_of_turn>`, EOS `<eos>`) gets the EOS
  appended like any other document.

The label mask marks the tokens that start inside a trained character span of the document
(`templates.DocumentRenderer`: the response, or the trained chat turns), plus the appended EOS
when the document's last turn is trained. Where tokens start comes from the fast tokenizer's
character offsets, or, for a byte-level BPE (Llama 3, SmolLM2, GPT-2's family: every token is
a byte string, so a document's tokens spell its UTF-8 bytes exactly), from the byte length of
each token id: then the ids come from `encode_batch_fast`, which tracks no offsets and is about
25% faster. A batch whose token bytes do not add up to its texts (a tokenizer that adds a
prefix space, say) is done with offsets, and so is every later one. When every token of a
batch is trained (`--train-on all`) no positions are computed and no mask is kept.

    >>> tokens, doc_lengths, mask = build_stream(tok, Path("train.jsonl"), train_on="assistant")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sftune.data.formats import Record, iter_records, peek
from sftune.data.limits import within_budget
from sftune.data.templates import Document, DocumentRenderer, adds_bos, resolve_train_on
from sftune.errors import DataError, SftuneError

DOCS_PER_BATCH = 2048  # documents tokenized per call: big enough for the Rust thread pool
# ... unless they hold more characters than this (about 2M Llama 3 tokens): a batch's token
# lists and the tokenizer's encodings take ~140 bytes a token (measured on 128K-token chats:
# 2,048 of them in one batch would be 37 GB), so long documents go in smaller batches.
BATCH_CHARS = 8_000_000
AGREE_CHARS = 4096  # characters of each sample text compared by `_backend_agrees`

# Trained character ranges of one document: None (all of it), a response's first character
# (the response runs to the end), or (start, end) ranges.
Spans = None | int | Sequence[tuple[int, int]]


def build_stream(
    tokenizer: Any,
    path: Path,
    fields: Mapping[str, str] | None = None,
    train_on: str | bool = "all",
    system_prompt: str | None = None,
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
    """Tokenize `path` batch by batch: (token chunks, document lengths, mask chunks or None).

    `train_on`: a `templates.TRAIN_ON` mode, `auto`, or a bool (the old `response_only`).
    Only two batches of records and their Python token lists exist at a time; everything else
    is numpy. The mask is None when every token is trained.

    Reading and rendering (Python, holding the GIL) overlap with encoding (Rust, which releases
    it): batch k+1 is rendered while a worker thread encodes batch k, in order.
    """
    renderer = DocumentRenderer(tokenizer, resolve_train_on(train_on, peek(path, fields)))
    encoder = DocumentEncoder(tokenizer, masked=True)
    encoded: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftune-encode") as worker:
        pending = None
        batches = _batched(iter_records(path, fields, system_prompt), DOCS_PER_BATCH, BATCH_CHARS)
        for records in batches:
            docs = render_batch(path, records, renderer)
            if pending is not None:
                encoded.append(pending.result())
            pending = worker.submit(
                encoder.encode,
                [d.text for d in docs],
                [d.spans for d in docs],
                [d.ends_with_eos for d in docs],
                [d.eos_trained for d in docs],
            )
        if pending is not None:
            encoded.append(pending.result())
    token_chunks = [tokens for tokens, _, _ in encoded]
    lengths = np.concatenate([doc_lengths for _, doc_lengths, _ in encoded])
    if all(mask is None for _, _, mask in encoded):
        return token_chunks, lengths, None
    masks = [np.ones(len(t), bool) if m is None else m for t, _, m in encoded]
    return token_chunks, lengths, masks


def _batched(items: Iterable[Record], size: int, max_chars: int) -> Iterator[list[Record]]:
    """Lists of up to `size` records, cut where the next would pass `max_chars` characters
    (`record_chars`); one record of more is a batch by itself."""
    batch: list[Record] = []
    chars = 0
    for record in items:
        n = record_chars(record)
        if batch and (len(batch) == size or chars + n > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(record)
        chars += n
    if batch:
        yield batch


def record_chars(record: Record) -> int:
    """The characters of a record's own text (what its rendering is, less the template's)."""
    if record.messages is None:
        return len(record.prompt) + len(record.response)
    return sum(len(m.get("content") or "") for m in record.messages)


def render_batch(path: Path, records: list[Record], renderer: DocumentRenderer) -> list[Document]:
    """Render records to `Document`s; a record that cannot be rendered names its line."""
    out = []
    for record in records:
        try:
            out.append(within_budget(renderer.render, record))  # RENDER_SECONDS per record
        except ValueError as e:
            raise DataError(path, str(e), line=record.line) from None
    return out


class DocumentEncoder:
    """Encode rendered documents to one int32 array ending each with one EOS, as `tokenizer(text)`.

    With a fast tokenizer the Rust backend is called directly (`encode_batch_fast`, no offsets,
    unless a label mask needs them), which skips building Python lists for the attention mask;
    the first batch is checked against `tokenizer(texts)` and the encoder falls back to it on
    any difference. `masked=False` ignores the spans (no mask, ever).

        >>> enc = DocumentEncoder(tok, masked=False)  # doctest: +SKIP
        >>> enc.encode(["Hi", "Yo"], [None, None])  # doctest: +SKIP
        (array([128000, 13347, 128001, 128000, 65825, 128001], dtype=int32), array([3, 3]), None)
    """

    def __init__(self, tokenizer: Any, masked: bool = False):
        self.tokenizer = tokenizer
        self.masked = masked
        self.eos = int(tokenizer.eos_token_id)
        self.use_backend: bool | None = None  # decided on the first batch
        self.token_bytes: np.ndarray | None = None  # byte length per id (byte-level BPE only)
        self._bytes_decided = False  # token_bytes is computed on the first masked batch

    def encode(
        self,
        texts: list[str],
        spans: Sequence[Spans],
        ends_with_eos: Sequence[bool] | None = None,
        eos_trained: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(tokens with one EOS ending each document, document lengths, label mask or None).

        `spans[j]`: the trained characters of text j (see `Spans`); `ends_with_eos[j]`: text j
        already ends with the EOS token's text, so no EOS is added (unless its last token turns
        out not to be the EOS id); `eos_trained[j]`: whether an appended EOS is trained
        (default: yes). The mask is None when every token is trained.
        """
        if self.use_backend is None:
            # The first characters of a few texts show any difference of the two pipelines
            # (post-processor, truncation, added tokens); whole texts would cost three
            # encodings of a batch whose first record may be megabytes long.
            self.use_backend = self._backend_agrees([t[:AGREE_CHARS] for t in texts[:8]])
        eos_trained = np.ones(len(texts), bool) if eos_trained is None else np.array(eos_trained)
        needs_mask = self.masked and (
            any(s is not None for s in spans) or not bool(eos_trained.all())
        )
        if needs_mask and not getattr(self.tokenizer, "is_fast", False):
            raise SftuneError("masking labels needs a fast tokenizer (for character offsets)")
        encode = self._encode_backend if self.use_backend else self._encode_python
        ids, ranges = encode(texts, spans if needs_mask else None)
        if ends_with_eos is None:
            append = np.ones(len(ids), dtype=bool)
        else:
            last = [doc[-1] if doc else None for doc in ids]
            append = np.array(
                [not (e and t == self.eos) for e, t in zip(ends_with_eos, last, strict=True)],
                dtype=bool,
            )
        return _pack_chunk(ids, ranges, self.eos, append, eos_trained)

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
        self, texts: list[str], spans: Sequence[Spans] | None
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        backend = self.tokenizer.backend_tokenizer
        fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
        if spans is None:
            return [e.ids for e in fast(texts)], None
        if not self._bytes_decided:
            self._bytes_decided = True
            self.token_bytes = token_byte_lengths(self.tokenizer)
        if self.token_bytes is not None:
            ids = [e.ids for e in fast(texts)]
            bos_added = adds_bos(self.tokenizer)
            ranges = _ranges_from_bytes(ids, texts, spans, self.token_bytes, bos_added)
            if ranges is not None:
                return ids, ranges
            self.token_bytes = None  # the bytes do not add up: offsets from now on
        encodings = backend.encode_batch(texts)
        ranges = []
        for e, text, doc_spans in zip(encodings, texts, spans, strict=True):
            at = _backend_locator(e, len(text))
            ranges.append([(at(s), at(end)) for s, end in _char_ranges(doc_spans, len(text))])
        return [e.ids for e in encodings], ranges

    def _encode_python(
        self, texts: list[str], spans: Sequence[Spans] | None
    ) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
        if spans is None:
            return self.tokenizer(texts)["input_ids"], None
        enc = self.tokenizer(texts, return_offsets_mapping=True)
        ranges = []
        for offsets, text, doc_spans in zip(enc["offset_mapping"], texts, spans, strict=True):

            def at(position, offsets=offsets):
                return _token_from_offsets(offsets, position)

            ranges.append([(at(s), at(end)) for s, end in _char_ranges(doc_spans, len(text))])
        return enc["input_ids"], ranges


def _char_ranges(spans: Spans, length: int) -> Sequence[tuple[int, int]]:
    if spans is None:
        return [(0, length)]
    if isinstance(spans, (int, np.integer)):
        return [(int(spans), length)]
    return spans


def _backend_locator(encoding: Any, length: int):
    """position -> index of the first token that starts at or after character `position`.

    A token belongs to the span where it starts (one that straddles a boundary stays on the
    earlier side); position 0 is the document's first token, a BOS included.
    """
    count = len(encoding.ids)

    def at(position: int) -> int:
        if position <= 0:
            return 0
        while position < length:
            token = encoding.char_to_token(position)
            if token is not None:
                while token < count:
                    chars = encoding.token_to_chars(token)
                    if chars is None or chars[0] >= position:
                        break
                    token += 1
                return token
            position += 1  # a character no token covers (trimmed whitespace): look further
        return count

    return at


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """The number of UTF-8 bytes each token id stands for, for a byte-level BPE without a
    normalizer (each character of a vocabulary entry is one byte of GPT-2's byte alphabet; an
    added token is its own text); None for any other tokenizer."""
    from tokenizers import decoders, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    vocab = backend.get_vocab(with_added_tokens=True)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for token, i in vocab.items():
        if i in added:
            lengths[i] = len(added[i].encode())
        elif set(token) <= alphabet:
            lengths[i] = len(token)
        else:
            return None
    return lengths


def _ranges_from_bytes(
    ids: list[list[int]],
    texts: list[str],
    spans: Sequence[Spans],
    token_bytes: np.ndarray,
    bos_added: bool,
) -> list[list[tuple[int, int]]] | None:
    """Token ranges of the spans, from the byte lengths of the ids (None when some document's
    tokens do not spell exactly its bytes). A token belongs to the span where it starts, as in
    `_backend_locator`; all documents are placed end to end, so one `searchsorted` does it."""
    counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(counts.sum()))
    lengths = token_bytes[flat]
    first_token = np.cumsum(counts) - counts
    if bos_added:  # the post-processor's BOS stands for no text
        lengths[first_token[counts > 0]] = 0
    text_bytes = np.fromiter(
        (len(t) if t.isascii() else len(t.encode()) for t in texts), np.int64, len(texts)
    )
    spelled = np.bincount(np.repeat(np.arange(len(ids)), counts), lengths, minlength=len(ids))
    if not np.array_equal(spelled, text_bytes):
        return None
    token_start = np.cumsum(lengths) - lengths
    first_byte = np.cumsum(text_bytes) - text_bytes
    owner, position = [], []
    for j, (text, doc_spans) in enumerate(zip(texts, spans, strict=True)):
        ascii_text = text.isascii()
        for start, end in _char_ranges(doc_spans, len(text)):
            for char in (start, end):
                owner.append(j)
                position.append(char if ascii_text else len(text[:char].encode()))
    owner_a, position_a = np.array(owner, dtype=np.int64), np.array(position, dtype=np.int64)
    found = np.searchsorted(token_start, first_byte[owner_a] + position_a, side="left")
    local = np.where(position_a <= 0, 0, found - first_token[owner_a]).tolist()
    ranges: list[list[tuple[int, int]]] = [[] for _ in texts]
    for k in range(0, len(local), 2):
        ranges[owner[k]].append((local[k], local[k + 1]))
    return ranges


def _token_from_offsets(offsets: Sequence[tuple[int, int]], position: int) -> int:
    """As `_backend_locator`, from an offsets list; zero-width special tokens (a BOS added by
    the post-processor) start nothing after position 0."""
    if position <= 0:
        return 0
    return next(
        (i for i, (lo, hi) in enumerate(offsets) if lo >= position and hi > lo), len(offsets)
    )


def _pack_chunk(
    ids: list[list[int]],
    ranges: list[list[tuple[int, int]]] | None,
    eos: int,
    append_eos: np.ndarray,
    eos_trained: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flatten token lists into int32, insert EOS after the documents flagged in `append_eos`,
    build the label mask (the tokens of each document's trained ranges, and each appended EOS
    flagged in `eos_trained`)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    tokens = np.insert(flat, np.cumsum(lengths)[append_eos], eos)
    lengths += append_eos  # the appended EOS
    if ranges is None:
        return tokens, lengths, None
    doc_starts = np.cumsum(lengths) - lengths
    counts = np.fromiter(map(len, ranges), dtype=np.int64, count=len(ranges))
    bounds = np.array(list(itertools.chain.from_iterable(ranges)), dtype=np.int64).reshape(-1, 2)
    offset = np.repeat(doc_starts, counts)[:, None]
    # +1 at each range's first token, -1 past its last: the running sum is > 0 inside one.
    edges = np.bincount((bounds + offset)[:, 0], minlength=len(tokens) + 1)
    edges -= np.bincount((bounds + offset)[:, 1], minlength=len(tokens) + 1)
    mask = np.cumsum(edges[:-1]) > 0
    appended = (doc_starts + lengths - 1)[append_eos]
    mask[appended] = eos_trained[append_eos]
    return tokens, lengths, mask
