"""Pack SFT documents into one token stream and cut it into fixed-length training windows.

The data package in the order a file goes through it: `formats.py` reads and validates records,
`templates.py` renders them, `tokenize.py` encodes them into one file-order token stream,
`cache.py` keeps that stream on disk, and this module selects, orders and windows it.

The rule (CS336 assignment 5, kept exactly so the course fixture matches token for token):

1. read the records (`formats.py`) and render each with the Alpaca template (`templates.py`);
2. encode each document with the tokenizer's own special-token handling (`tokenizer(text)`,
   which for Llama 3 prepends `<|begin_of_text|>`) and append `tokenizer.eos_token_id`
   (a chat whose template already ends with the EOS text keeps that one instead, so every
   document ends with exactly one EOS: see `tokenize.py`);
3. with `shuffle=True` shuffle the documents (seeded), else keep the file's order;
4. concatenate them into one stream of L tokens; with m = seq_length there are (L - 1) // m
   items, item i = stream[i*m : (i+1)*m] and its labels the same window shifted by one.
   The tail that cannot fill a window is dropped.

A worked example with m = 3. Document A renders to B a1 a2 (B = BOS) and document B to
B b1 b2 b3; E (EOS) ends each one:

    stream      B  a1 a2 E  B  b1 b2 b3 E        L = 9, items = (9 - 1) // 3 = 2
    index       0  1  2  3  4  5  6  7  8
    item 0     [B  a1 a2]                        labels = stream[1:4]
    item 1              [E  B  b1]               labels = stream[4:7]
                                 b2 is only a label; the tail b3 E is dropped

    item 0  input_ids     B  a1 a2            item 1  input_ids     E  B  b1
            labels        a1 a2 E                     labels        B  b1 b2
            position_ids  0  1  2                     position_ids  0  0  1

Options beyond the course:

* `train_on` chooses the trained labels; the others are -100 (found from the fast tokenizer's
  character offsets), and the windows are the same as without masking. `all` (the course's
  rule, the default for prompt/response and Alpaca records) trains every label; `assistant`
  (the default for chats; `response_only=True` is its old name) trains the responses, or every
  assistant turn of a chat; `last` only a chat's final assistant turn. If a1 is prompt and a2
  the response, `assistant` makes item 0's labels -100 a2 E and item 1's -100 -100 b2 (B and b1
  are prompt). The EOS and the response stay trained.

  A chat, in ChatML (SmolLM2's template, which also writes a default system turn, left out
  here; s = `<|im_start|>`, e = `<|im_end|>`, which is also the EOS, so the document ends
  with the template's own e and gets no second one; n = newline):

      messages   user "hi", assistant "yo", user "2+2?", assistant "4"
      text       s user n hi e n s assistant n yo e n s user n 2+2? e n s assistant n 4 e
      trained                                 yo e                                   4 e

  Each assistant turn is trained with its end-of-turn e (so the model learns to stop); its
  header (s assistant n), the newline after e, the user turns and the system prompt are not.
  Where e is not the EOS (Gemma's `<end_of_turn>`, EOS `<eos>`), the EOS is appended after the
  last turn (and the newline the template writes after its e) and trained. The chat worked example with real token ids is in
  docs/DATA.md; `sftune prepare --show N` prints any file's first documents this way.
* `packing="whole"` (`--packing whole`; the default `split` is the rule above) keeps each
  document inside one item. Items no longer overlap: item i is tokens[i*(m+1) : (i+1)*(m+1)],
  inputs its first m tokens and labels its last m, so a document of up to m + 1 tokens fits
  (its final EOS is only a label). A document that does not fit in the rest of an item starts
  the next one; the rest is padding P (the tokenizer's pad id, else its EOS), never trained.
  The example above, whole, m = 3, and a third document C = B c1 E:

      item 0  input_ids     B  a1 a2            labels  a1 a2 E
      item 1  input_ids     B  b1 b2            labels  b1 b2 b3       B b1 b2 b3 E: 5 > 4
      item 2  input_ids     B  c1 E             labels  c1 E  -100     (P, untrained)

  Document B is longer than an item: `overlong="refuse"` (the default) stops with one line
  naming its file, line and length; `overlong="truncate"` keeps its first m + 1 tokens, as
  above (b3 is trained, the EOS is dropped). Padding changes no real token's loss: it comes
  after them and attention is causal; with position ids it restarts at 0 like a document. The summary line counts the documents
  moved to the next item and the truncated ones; under `split`, for chats, how many
  conversations cross an item boundary (some of their tokens predicted in a later item than
  their first).
* `position_ids=True` adds positions that restart at 0 at every document start AND at each
  item's first token (item 1 above: E is the end of document A, yet starts at 0). Flash
  attention's varlen path and transformers' packed-sequence detection read a restart to 0
  as "a new sequence starts here", so attention never crosses a document boundary.
* `holdout_fraction` / `holdout` split the DOCUMENTS (not windows) with a seeded draw:
  `holdout=False` keeps the others, `holdout=True` only the held-out ones; the same seed
  gives complementary sets.

The file-order stream, its document offsets and the label mask live in numpy arrays cached on
disk (`cache.py`: `SFTUNE_CACHE_DIR`, default `platformdirs.user_cache_dir("sftune")`,
subfolder `packed`), keyed by the file's contents, the tokenizer (its chat template included),
the Alpaca template, the field mapping, the `train_on` mode and the system prompt. Shuffle,
holdout, `packing` and position ids are applied when loading, so one cache entry serves them all. The dataset remembers its file, field mapping and the
file-order indices of its documents, so `sample_records(n)` can show a few of its records
(the trainer's sample generations) without splitting the file again:

    >>> ds = PackedSFTDataset(tok, "sft_sample.jsonl", seq_length=32, shuffle=False)  # doctest: +SKIP
    sftune: sft_sample.jsonl: prompt/response records (detected), training on every token: 5 documents, 2,431 tokens -> 75 items of 32 (98.7% of tokens kept), built in 0.3 s
    >>> ds[0]["input_ids"][:4]  # doctest: +SKIP
    tensor([128000,  39314,    374,    459])
    >>> [r.line for r in ds.sample_records(2)]  # doctest: +SKIP
    [1, 3]
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.data.cache import PackedStream, load_or_build
from sftune.data.constants import IGNORE_INDEX
from sftune.data.formats import CHAT_FORMATS, FORMAT_NAMES, Record, iter_records, peek
from sftune.data.templates import resolve_train_on
from sftune.errors import ConfigError, DataError

_HOLDOUT_STREAM, _SHUFFLE_STREAM = 1, 2  # independent random streams derived from `seed`
PACKING = ("split", "whole")
OVERLONG = ("refuse", "truncate")


@dataclass(frozen=True)
class PackStats:
    """What a packed dataset holds; `summary()` is the line printed when verbose."""

    file: str
    documents: int
    tokens: int
    items: int
    seq_length: int
    trained_tokens: int
    from_cache: bool
    seconds: float = 0.0
    format: str = ""  # formats.FORMAT_NAMES key; "" when unknown
    train_on: str = "all"
    detected: bool = True  # the format came from the first record, not a field mapping
    packing: str = "split"
    crossing: int = 0  # split: documents whose tokens are predicted in more than one item
    moved: int = 0  # whole: documents that started the next item (the rest of one was padded)
    truncated: int = 0  # whole: documents cut to one item (--overlong truncate)
    padding: int = 0  # whole: padding tokens in the items

    @property
    def tokens_kept_fraction(self) -> float:
        """Share of the stream that appears as input in some item: items * m / L (split), or
        the real tokens kept after truncation over L (whole)."""
        if not self.tokens:
            return 0.0
        if self.packing == "whole":
            return (self.items * (self.seq_length + 1) - self.padding) / self.tokens
        return self.items * self.seq_length / self.tokens

    def summary(self) -> str:
        how = "loaded from cache" if self.from_cache else "built"
        what = ""
        if self.format:
            source = "detected" if self.detected else "--fields"
            what = (
                f"{FORMAT_NAMES[self.format]} records ({source}), training on "
                f"{describe_train_on(self.train_on, self.format)}: "
            )
        return (
            f"sftune: {self.file}: {what}{self.documents:,} documents, {self.tokens:,} tokens -> "
            f"{self.items:,} items of {self.seq_length} ({self._layout()}), "
            f"{how} in {self.seconds:.1f} s"
        )

    def _layout(self) -> str:
        """How the documents lie in the items: what a user needs to know about boundaries."""
        kept = f"{self.tokens_kept_fraction:.1%} of tokens kept"
        chats = self.format in CHAT_FORMATS
        if self.packing == "whole":
            what = "conversations" if chats else "documents"
            return (
                f"whole {what}: {kept}, {self.padding:,} padding tokens; moved to the next "
                f"item: {self.moved:,}, truncated: {self.truncated:,}"
            )
        if not chats:  # the course rule, reported as it always was
            return kept
        return (
            f"{kept}; {self.crossing:,} of {self.documents:,} conversations cross an item "
            "boundary, --packing whole keeps each in one item"
        )


def describe_train_on(train_on: str, shape: str) -> str:
    """What `train_on` trains in records of `shape`, in words (`PackStats.summary`)."""
    if train_on == "all":
        return "every token"
    if shape not in CHAT_FORMATS:
        return "responses"
    return "assistant turns" if train_on == "assistant" else "the last assistant turn"


class PackedSFTDataset(torch.utils.data.Dataset):
    """Fixed-length windows over the packed token stream of an SFT file (see the module doc).

    Besides the windows it keeps where they came from: `path`, `fields`, `system_prompt`,
    `document_indices` (the file-order indices of the records it holds, ascending), for
    `sample_records`, and `stream_documents` (the same in stream order, after any shuffle).
    `train_on` is the resolved mode (`all`, `assistant` or `last`).
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset_path: str | os.PathLike,
        seq_length: int,
        shuffle: bool,
        *,
        seed: int = 0,
        fields: Mapping[str, str] | None = None,
        train_on: str = "auto",
        response_only: bool = False,
        system_prompt: str | None = None,
        packing: str = "split",
        overlong: str = "refuse",
        position_ids: bool = False,
        holdout_fraction: float = 0.0,
        holdout: bool = False,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        verbose: bool = True,
    ):
        start = time.perf_counter()
        path = Path(dataset_path)
        _check_arguments(tokenizer, path, seq_length, holdout_fraction, packing, overlong)
        self.path = path
        self.fields = dict(fields) if fields else None
        self.system_prompt = system_prompt or None
        self.seq_length = seq_length
        self.with_position_ids = position_ids
        self.format = peek(path, fields)
        self.train_on = resolve_train_on(train_on, self.format, response_only)
        base, from_cache = load_or_build(
            tokenizer,
            path,
            fields,
            self.train_on,
            system_prompt=self.system_prompt,
            cache_dir=cache_dir,
            use_cache=use_cache,
        )
        docs = select_documents(len(base.doc_offsets) - 1, holdout_fraction, holdout, seed)
        self.document_indices = docs
        if shuffle:
            docs = np.random.default_rng((seed, _SHUFFLE_STREAM)).permutation(docs)
        self.stream_documents = docs
        self.packing = packing
        tokens, mask, doc_starts = _arrange(base, docs)
        total = len(tokens)
        lengths = np.diff(np.append(doc_starts, total))
        if packing == "whole":
            layout = self._whole(tokenizer, tokens, mask, doc_starts, lengths, overlong)
        else:
            layout = self._split(tokens, mask, doc_starts, lengths)
        if self.num_items == 0:
            raise DataError(
                path,
                f"too small for one item: {total} tokens, one item of seq_length "
                f"{seq_length} needs {seq_length + 1}",
            )
        self.stats = PackStats(
            file=path.name,
            documents=len(docs),
            tokens=total,
            items=self.num_items,
            seq_length=seq_length,
            trained_tokens=self._count_trained(),
            from_cache=from_cache,
            seconds=time.perf_counter() - start,
            format=self.format,
            train_on=self.train_on,
            detected=not fields,
            packing=packing,
            **layout,
        )
        if verbose:
            print(self.stats.summary(), flush=True)

    def _split(self, tokens, mask, doc_starts, lengths) -> dict[str, int]:
        """The course rule: items cut the stream every seq_length tokens (see the module doc)."""
        m = self.seq_length
        self._tokens, self._mask, self._doc_starts = tokens, mask, doc_starts
        self._doc_ends = doc_starts + lengths
        self._segment_starts = doc_starts
        self._stride = m
        self.num_items = max(len(tokens) - 1, 0) // m
        return {"crossing": count_crossing(doc_starts, lengths, m, self.num_items)}

    def _whole(self, tokenizer, tokens, mask, doc_starts, lengths, overlong) -> dict[str, int]:
        """Each document inside one item; the rest of an item is padding (see the module doc)."""
        width = self.seq_length + 1  # an item's inputs and its last label
        too_long = np.flatnonzero(lengths > width)
        if len(too_long) and overlong == "refuse":
            first = too_long[np.argmin(self.stream_documents[too_long])]  # in file order
            self._refuse(int(lengths[first]), int(self.stream_documents[first]))
        kept = np.minimum(lengths, width)
        starts, rows, moved = place_whole(kept, width)
        pad = getattr(tokenizer, "pad_token_id", None)
        out = np.full(rows * width, tokenizer.eos_token_id if pad is None else pad, np.int32)
        trained = np.zeros(rows * width, dtype=bool)
        _copy_documents(tokens, doc_starts, kept, out, starts)
        # Always a mask, even when every token is trained: the padding is not.
        source_mask = np.ones(len(tokens), bool) if mask is None else mask
        _copy_documents(source_mask, doc_starts, kept, trained, starts)
        ends = starts + kept
        padded = ends[(ends % width != 0) & ~np.isin(ends, starts)]  # padding starts there
        self._tokens, self._mask, self._doc_starts = out, trained, starts
        self._doc_ends = ends
        self._segment_starts = np.union1d(starts, padded)  # positions restart at padding too
        self._stride = width
        self.num_items = rows
        return {
            "moved": moved,
            "truncated": len(too_long),
            "padding": rows * width - int(kept.sum()),
        }

    def _refuse(self, length: int, index: int) -> None:
        """One line naming the too-long document `index` (file order): its file and line."""
        line = next(
            r.line
            for k, r in enumerate(iter_records(self.path, self.fields, self.system_prompt))
            if k == index
        )
        m = self.seq_length
        raise DataError(
            self.path,
            f"a document of {length:,} tokens is too long for one item of --seq-length {m} "
            f"(at most {m + 1:,} tokens, its final EOS only a label): use --overlong truncate, "
            "a longer --seq-length, or --packing split",
            line=line,
        )

    @property
    def tokens(self) -> np.ndarray:
        """The whole packed stream (int32, after shuffle and holdout), tail included; with
        `packing="whole"`, the items back to back, padding included (item i is
        tokens[i * (seq_length + 1) : (i + 1) * (seq_length + 1)])."""
        return self._tokens

    @property
    def doc_starts(self) -> np.ndarray:
        """Where each document starts in `tokens` (its BOS, for tokenizers that add one)."""
        return self._doc_starts

    @property
    def doc_ends(self) -> np.ndarray:
        """Where each document ends in `tokens` (one past its last token kept)."""
        return self._doc_ends

    @property
    def mask(self) -> np.ndarray | None:
        """Which tokens of `tokens` are trained as label targets (None: all of them)."""
        return self._mask

    @property
    def num_trained_tokens(self) -> int:
        """Labels that are not -100, over all items."""
        return self.stats.trained_tokens

    def sample_records(self, n: int) -> list[Record]:
        """`n` of this dataset's records, evenly spaced in file order, re-read from `path`.

        The picks are kept documents number i * len // n for i < n (all of them when there
        are fewer than n), so they cover more than the file's first task or topic; a
        held-out set (`holdout=True`) samples only held-out records.
        """
        kept = self.document_indices
        count = min(max(n, 0), len(kept))
        if count == 0:
            return []
        wanted = {int(kept[i * len(kept) // count]) for i in range(count)}
        out: list[Record] = []
        for index, record in enumerate(iter_records(self.path, self.fields, self.system_prompt)):
            if index in wanted:
                out.append(record)
                if len(out) == len(wanted):
                    break
        return out

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_items <= index < self.num_items:
            raise IndexError(f"item {index} out of range for {self.num_items} items")
        batch = self.get_batch(np.array([index % self.num_items]))
        return {key: value[0] for key, value in batch.items()}

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Items `indices` stacked to (len(indices), seq_length), gathered in one numpy step."""
        starts = np.asarray(indices, dtype=np.int64) * self._stride
        window = starts[:, None] + np.arange(self.seq_length + 1)  # inputs + one label
        tokens = self._tokens[window].astype(np.int64)
        labels = tokens[:, 1:]
        if self._mask is not None:
            labels = np.where(self._mask[window[:, 1:]], labels, IGNORE_INDEX)
        batch = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }
        if self.with_position_ids:
            batch["position_ids"] = torch.from_numpy(self._positions(window[:, :-1], starts))
        return batch

    def _positions(self, window: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Distance to the latest document (or padding) start or to the item's first token,
        whichever is later."""
        doc = np.searchsorted(self._segment_starts, window, side="right") - 1
        fragment_start = np.maximum(self._segment_starts[np.maximum(doc, 0)], starts[:, None])
        return window - fragment_start

    def _count_trained(self) -> int:
        m = self.seq_length
        if self.packing == "whole":  # an item's first token is no label
            return int(np.count_nonzero(self._mask.reshape(-1, m + 1)[:, 1:]))
        used = self.num_items * m
        if self._mask is None:
            return used
        return int(np.count_nonzero(self._mask[1 : used + 1]))


def _check_arguments(
    tokenizer: Any,
    path: Path,
    seq_length: Any,
    holdout_fraction: float,
    packing: str,
    overlong: str,
) -> None:
    """Fail before any work on settings that cannot produce a dataset."""
    if packing not in PACKING:
        raise ConfigError(f"packing: {packing!r} is not one of {', '.join(PACKING)}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong: {overlong!r} is not one of {', '.join(OVERLONG)}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)):
        raise DataError(path, f"seq_length must be an integer >= 1, got {seq_length!r}")
    if seq_length < 1:
        raise DataError(path, f"seq_length must be an integer >= 1, got {seq_length}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError(path, "the tokenizer has no EOS token, which packing needs as delimiter")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")


def select_documents(count: int, fraction: float, holdout: bool, seed: int) -> np.ndarray:
    """File-order indices of the documents kept: the held-out ones or the others.

    At least one document is held out when `fraction > 0`.

        >>> select_documents(10, 0.3, True, seed=0), select_documents(10, 0.3, False, seed=0)
        (array([1, 3, 9]), array([0, 2, 4, 5, 6, 7, 8]))
    """
    if fraction <= 0:
        return np.arange(count)
    held = np.zeros(count, dtype=bool)
    n_held = max(1, round(fraction * count))
    held[np.random.default_rng((seed, _HOLDOUT_STREAM)).permutation(count)[:n_held]] = True
    return np.flatnonzero(held if holdout else ~held)


def _arrange(
    base: PackedStream, docs: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Tokens and mask with documents `docs` back to back, and where each document starts.

    All documents in file order reuse the (memory-mapped) arrays as they are.
    """
    lengths = np.diff(base.doc_offsets)[docs]
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if len(docs) == len(lengths) and np.array_equal(docs, np.arange(len(base.doc_offsets) - 1)):
        return base.tokens, base.mask, doc_starts
    tokens = _gather_documents(base.tokens, base.doc_offsets, docs)
    mask = None if base.mask is None else _gather_documents(base.mask, base.doc_offsets, docs)
    return tokens, mask, doc_starts


def _gather_documents(
    array: np.ndarray, doc_offsets: np.ndarray, docs: np.ndarray, block: int = 8192
) -> np.ndarray:
    """array's document slices in the order `docs`, copied in blocks to bound the index memory."""
    sources = doc_offsets[docs]
    lengths = doc_offsets[docs + 1] - sources
    targets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.empty(int(targets[-1]), dtype=array.dtype)
    for lo in range(0, len(docs), block):
        hi = min(lo + block, len(docs))
        shift = np.repeat(sources[lo:hi] - targets[lo:hi], lengths[lo:hi])
        out[targets[lo] : targets[hi]] = array[np.arange(targets[lo], targets[hi]) + shift]
    return out


def count_crossing(starts: np.ndarray, lengths: np.ndarray, m: int, items: int) -> int:
    """Documents (starting within the items) whose tokens are predicted in more than one item.

    A document's tokens after its first are predicted at its positions start .. end - 2, so it
    crosses a boundary when those are not all in one item (one cut by the dropped tail too).

        >>> count_crossing(np.array([0, 4]), np.array([4, 5]), m=3, items=2)  # the example above
        1
    """
    inside = starts < items * m
    last_input = starts + np.maximum(lengths - 2, 0)
    return int(np.count_nonzero(inside & (starts // m != last_input // m)))


def place_whole(lengths: np.ndarray, width: int) -> tuple[np.ndarray, int, int]:
    """(where each document starts, items, documents moved): documents in order, each in one
    item of `width` tokens (all fit); one that does not fit in the rest of an item starts the next.

        >>> place_whole(np.array([3, 4, 2]), width=4)
        (array([0, 4, 8]), 3, 1)
    """
    starts = np.empty(len(lengths), dtype=np.int64)
    row, fill, moved = 0, 0, 0
    for j, n in enumerate(lengths.tolist()):
        if fill + n > width:
            moved += fill < width  # an item already full moves nothing
            row, fill = row + 1, 0
        starts[j] = row * width + fill
        fill += n
    return starts, row + (fill > 0), moved


def _copy_documents(
    source: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
    targets: np.ndarray,
    block: int = 8192,
) -> None:
    """out[targets[j] : targets[j] + lengths[j]] = source[starts[j] : ...] for every document j,
    in blocks of documents to bound the index memory."""
    for lo in range(0, len(starts), block):
        hi = min(lo + block, len(starts))
        n = lengths[lo:hi]
        within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        out[np.repeat(targets[lo:hi], n) + within] = source[np.repeat(starts[lo:hi], n) + within]
