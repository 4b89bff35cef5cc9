"""The preference-pair data kind: a file of pairs -> cached token ids -> packed rows -> batches.

The pair analogue of `packing.py`'s `PackedSFTDataset`, in the order a file goes through it:

1. `preference.require_pairs` names the file's form from its first record (strings,
   conversational, Anthropic HH) and refuses SFT records in one line;
2. `preference.read_pairs` reads every pair (a missing, empty or mixed-form record is a
   one-line `DataError` with its file, line and field; chosen == rejected pairs are counted
   and skipped), and `preference.PairEncoder` turns each into token ids with SFT's renderer and
   encoder; a pair whose two responses encode to the same ids is skipped the same way;
3. the ids are cached on disk in file order (below), so a restart, another rank or the next
   run with other split/shuffle/packing settings does not tokenize again;
4. with `holdout_fraction` f a seeded draw holds out round(f * pairs) of them (at least one):
   `holdout=False` keeps the others, `holdout=True` only the held-out ones (the validation set
   when there is no --val-data), the same draw as SFT's `select_documents`;
5. with `shuffle=True` the kept pairs are permuted (seeded, the same stream as SFT's document
   shuffle), then `pairs.pack_pairs` lays each out once as prompt | chosen | rejected in rows
   of `seq_length`, cutting a pair that is too long as `truncation` says.

Pair index i of the dataset (`pair_ids` in a batch, the rows of `set_reference`) is the i-th
pair in that packing order; `pair_indices[i]` is its index among the file's usable pairs and
`pair_lines[i]` its line.

    >>> ds = PackedPairDataset(tok, "pairs.jsonl", seq_length=512, shuffle=True)  # doctest: +SKIP
    sftune: pairs.jsonl: prompt/chosen/rejected strings (detected); skipped 3 with chosen equal to rejected: 997 pairs -> 412 rows of 512 (...); cut to fit: 2 (prompt 0, responses 2), built in 1.2 s
    >>> b = ds.get_batch([0, 1])  # doctest: +SKIP
    >>> b["input_ids"].shape, b["pair_ids"]  # doctest: +SKIP
    (torch.Size([2, 512]), tensor([  0,   1,   2,   3,   4]))
    >>> ds.set_reference(ref_logps)  # (num_pairs, 2) float64: the reference pass  # doctest: +SKIP
    >>> ds.get_batch([0, 1])["ref_logps"].shape  # doctest: +SKIP
    torch.Size([5, 2])

The cache (`<cache root>/pairs/<file name>-<key>/`, `SFTUNE_CACHE_DIR` as for SFT) holds .npy
files read with `allow_pickle=False` (memory-mapped) and a meta.json; nothing is unpickled:

    tokens.npy   int32 (L,)        each usable pair's prompt, chosen and rejected ids, back to back
    scored.npy   bool (L,)         which of those are scored (the responses' trained tokens)
    sizes.npy    int64 (pairs, 3)  prompt, chosen and rejected lengths
    lines.npy    int64 (pairs,)    each pair's line in the file (Parquet: 1-based row)
    meta.json    form, the skip counts, the source path

Its key hashes the file's bytes, the tokenizer (chat template included), the Alpaca template,
the field mapping, `single_turn` and `CACHE_VERSION`. Entries are written with
`files.atomic_dir(replace=False)`: a reader sees a whole entry or none, and the first of two
writers to finish wins. As for SFT the trainer builds the set on rank 0 first, then, after a
barrier, the other ranks read the entry. `cache_key` (the dataset's) adds everything else the
packed rows depend on (seq_length, truncation, shuffle, seed, the holdout split): the
reference log-probs are cached under it, with the reference model's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.data.cache import content_key
from sftune.data.packing import _SHUFFLE_STREAM, select_documents
from sftune.data.pairs import check_layout, pack_pairs, summary
from sftune.data.preference import (
    PAIR_FORMAT_NAMES,
    Pair,
    PairEncodeError,
    PairEncoder,
    PairTokens,
    _skipped,
    pairs_at_lines,
    parse_pair_fields,
    read_pairs,
    require_pairs,
)
from sftune.errors import ConfigError, DataError, SftuneError
from sftune.files import atomic_dir
from sftune.paths import cache_root

__all__ = ["CACHE_VERSION", "PackedPairDataset", "TokenizedPairs", "require_pairs"]

CACHE_VERSION = 1  # bump whenever the encoding of a pair changes
ENCODE_BATCH = 512  # pairs rendered and tokenized per tokenizer call


class TokenizedPairs:
    """The usable pairs of a file as token ids, in file order (one cache entry)."""

    def __init__(self, tokens, scored, sizes, lines, meta: dict[str, Any]):
        self.tokens, self.scored, self.sizes, self.lines = tokens, scored, sizes, lines
        self.meta = meta
        self.offsets = np.concatenate([[0], np.cumsum(sizes.sum(axis=1))]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def parts(self, pairs: np.ndarray) -> tuple[list, list, list, list, list]:
        """Prompts, chosen, rejected ids and the responses' scored masks of `pairs`, in order."""
        out: tuple[list, ...] = ([], [], [], [], [])
        for j in pairs.tolist():
            start = int(self.offsets[j])
            p, c, r = (int(n) for n in self.sizes[j])
            cut = (start, start + p, start + p + c, start + p + c + r)
            out[0].append(self.tokens[cut[0] : cut[1]])
            out[1].append(self.tokens[cut[1] : cut[2]])
            out[2].append(self.tokens[cut[2] : cut[3]])
            out[3].append(self.scored[cut[1] : cut[2]])
            out[4].append(self.scored[cut[2] : cut[3]])
        return out


def tokens_key(tokenizer: Any, path: Path, fields: Mapping | None, single_turn: bool) -> str:
    """The key of a file's cache entry: what changes the ids of its pairs."""
    return content_key(CACHE_VERSION, tokenizer, path, fields, single_turn=bool(single_turn))


def load_or_encode(
    tokenizer: Any,
    path: Path,
    fields: Mapping | None,
    single_turn: bool,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[TokenizedPairs, str, bool]:
    """The file's tokenized pairs, from the cache when present: (pairs, key, from_cache)."""
    key = tokens_key(tokenizer, path, fields, single_turn)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "pairs"
    entry = root / f"{path.name}-{key}"
    if (entry / "meta.json").is_file():
        return _load_entry(entry), key, True
    arrays, meta = _encode(tokenizer, path, fields, single_turn)
    with atomic_dir(entry, replace=False) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps(meta))  # last: its presence marks a whole entry
    return _load_entry(entry), key, False


def _load_entry(entry: Path) -> TokenizedPairs:
    """The entry's arrays, checked against each other: a damaged entry (a disk error, a hand
    edit) is one line naming it, never pairs silently cut or shifted."""

    def load(name: str, mmap: bool = True) -> np.ndarray:
        array = np.load(entry / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        return array.view(np.ndarray)  # still the mapped pages; slices skip np.memmap's overhead

    try:
        meta = json.loads((entry / "meta.json").read_text())
        tokens, scored = load("tokens"), load("scored")
        sizes, lines = load("sizes", False), load("lines", False)
    except (OSError, ValueError) as e:
        raise _damaged(entry, f"{type(e).__name__}: {e}") from None
    n = meta.get("pairs") if isinstance(meta, dict) else None
    if sizes.shape != (n, 3) or lines.shape != (n,) or tokens.shape != scored.shape:
        raise _damaged(entry, "its arrays disagree in length")
    if tokens.shape != (int(sizes.sum()),) or tokens.dtype != np.int32 or scored.dtype != bool:
        raise _damaged(entry, "its token arrays do not match the pair sizes")
    return TokenizedPairs(tokens, scored, sizes, lines, meta)


def _damaged(entry: Path, why: str) -> SftuneError:
    first = why.strip().splitlines()[0] if why.strip() else why
    return SftuneError(f"the pair cache entry {entry} is damaged ({first}): delete it and rerun")


def _encode(tokenizer, path: Path, fields, single_turn: bool) -> tuple[dict, dict]:
    """Read and encode every usable pair of `path` (the cache entry's arrays and meta)."""
    pair_file = read_pairs(path, fields, single_turn)
    tokens, scored, sizes, lines = [], [], [], []
    identical = pair_file.identical
    for pair, t in zip(pair_file.pairs, _encode_all(tokenizer, path, pair_file.pairs), strict=True):
        # Texts that differ can render to the same ids (HH's responses are stripped, a chat
        # message's flags are not rendered): nothing to learn from, skipped like equal texts.
        if t.chosen == t.rejected and np.array_equal(t.chosen_mask, t.rejected_mask):
            identical += 1
            continue
        tokens.append(np.asarray(t.prompt + t.chosen + t.rejected, np.int32))
        scored.append(
            np.concatenate([np.zeros(len(t.prompt), bool), t.chosen_mask, t.rejected_mask])
        )
        sizes.append((len(t.prompt), len(t.chosen), len(t.rejected)))
        lines.append(pair.line)
    if not tokens:
        skipped = _skipped(identical, pair_file.multi_turn)
        total = identical + pair_file.multi_turn
        raise DataError(path, f"no usable pair: all {total:,} skipped, {skipped}")
    arrays = {
        "tokens": np.concatenate(tokens),
        "scored": np.concatenate(scored),
        "sizes": np.asarray(sizes, np.int64).reshape(-1, 3),
        "lines": np.asarray(lines, np.int64),
    }
    meta = {
        "source": str(path),
        "form": pair_file.form,
        "identical": identical,
        "multi_turn": pair_file.multi_turn,
        "pairs": len(lines),
    }
    return arrays, meta


def _encode_all(tokenizer, path: Path, pairs: list[Pair]) -> Iterator[PairTokens]:
    """`PairEncoder.encode_batch` over `pairs`, `ENCODE_BATCH` at a time; an error names its line."""
    encoder = PairEncoder(tokenizer)
    for lo in range(0, len(pairs), ENCODE_BATCH):
        batch = pairs[lo : lo + ENCODE_BATCH]
        try:
            yield from encoder.encode_batch(batch)
        except PairEncodeError as e:
            raise DataError(path, str(e), line=batch[e.index].line) from None


class PackedPairDataset(torch.utils.data.Dataset):
    """Packed rows of preference pairs, and their flat targets, for DPO and its family.

    See the module doc for what is done in which order. `len(ds)` counts rows; a batch is
    `get_batch(rows)`; `ds[i]` is `get_batch([i])`. `fields` maps our names (prompt, chosen,
    rejected) to the file's keys, or is `--fields`' text (`parse_pair_fields`). Besides the
    interface: `pair_indices` (each pair's index among the file's usable pairs, in packing
    order), `pair_lines` (its line), `seq_length`, `truncation`, `single_turn`, `fields`.
    """

    def __init__(
        self,
        tokenizer: Any,
        dataset_path: str | os.PathLike,
        seq_length: int,
        shuffle: bool,
        *,
        seed: int = 0,
        fields: Mapping[str, str] | str | None = None,
        truncation: str = "refuse",
        single_turn: bool = False,
        holdout_fraction: float = 0.0,
        holdout: bool = False,
        verbose: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ):
        start = time.perf_counter()
        path = Path(dataset_path)
        fields = parse_pair_fields(fields) if isinstance(fields, str) else fields
        _check_arguments(tokenizer, path, seq_length, truncation, holdout_fraction)
        self.path = str(path)
        self.fields = dict(fields) if fields else None
        self.seq_length, self.truncation, self.single_turn = seq_length, truncation, single_turn
        self.format = require_pairs(path, self.fields)
        base, key, from_cache = load_or_encode(tokenizer, path, self.fields, single_turn, cache_dir)
        self.pair_indices = _select(base, path, holdout_fraction, holdout, shuffle, seed)
        self.pair_lines = np.asarray(base.lines[self.pair_indices])
        prompts, chosen, rejected, c_mask, r_mask = base.parts(self.pair_indices)
        pad = getattr(tokenizer, "pad_token_id", None)
        self._packed = pack_pairs(
            prompts,
            chosen,
            rejected,
            seq_length,
            pad_id=tokenizer.eos_token_id if pad is None else pad,
            truncation=truncation,
            path=path,
            lines=self.pair_lines.tolist(),
            chosen_mask=c_mask,
            rejected_mask=r_mask,
        )
        self.num_pairs = len(self.pair_indices)
        self._trained = int(np.count_nonzero(self._packed.source >= 0))
        self._ref: np.ndarray | None = None
        self.cache_key = _dataset_key(
            key, seq_length, truncation, shuffle, seed, holdout_fraction, holdout
        )
        self.stats = dict(
            self._packed.stats,
            file_pairs=len(base),
            identical=base.meta["identical"],
            multi_turn=base.meta["multi_turn"],
            trained_tokens=self._trained,
        )
        self.summary = self._summary(
            from_cache, time.perf_counter() - start, holdout_fraction, holdout
        )
        if verbose:
            print(self.summary, flush=True)

    def _summary(self, from_cache: bool, seconds: float, fraction: float, holdout: bool) -> str:
        s = self.stats
        source = "--fields" if self.fields else "detected"
        text = f"sftune: {Path(self.path).name}: {PAIR_FORMAT_NAMES[self.format]} ({source})"
        if skipped := _skipped(s["identical"], s["multi_turn"]):
            text += f"; skipped {skipped}"
        if fraction > 0:
            which = "held out" if holdout else "kept after holding out"
            text += f"; {which} {self.num_pairs:,} of {s['file_pairs']:,} pairs ({fraction:g})"
        how = "loaded from cache" if from_cache else "built"
        return f"{text}: {summary(s)}, {how} in {seconds:.1f} s"

    @property
    def num_trained_tokens(self) -> int:
        """The scored response tokens of all pairs, chosen and rejected (after any cut)."""
        return self._trained

    def __len__(self) -> int:
        return self._packed.stats["rows"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self.get_batch([index % len(self)])

    def get_batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows `rows` (B of them, length T) and their N scored tokens of n pairs, as torch:

        input_ids, position_ids, segment (B, T) int64 (segment: 3 * pair + part, -1 padding:
        what `pairs.flex_block_mask` / `attention_mask_4d` take); source, target, pair, side
        (N,) int64 (`PackedPairs.targets`: pair is local, 0 .. n-1; side 0 chosen, 1 rejected);
        pair_ids (n,) int64, the dataset's index of each local pair; ref_logps (n, 2) float64
        (chosen, rejected) once `set_reference` was called.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        b, t = self._packed.batch(rows), self._packed.targets(rows)
        out = {name: b[name] for name in ("input_ids", "position_ids", "segment")}
        out.update({name: t[name] for name in ("source", "target", "pair", "side")})
        out["pair_ids"] = t["pairs"]
        if self._ref is not None:
            out["ref_logps"] = self._ref[t["pairs"]]
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def set_reference(self, logps: np.ndarray) -> None:
        """The reference model's summed log-probs of every pair, (num_pairs, 2) float64, row i
        for pair i (chosen, rejected); `get_batch` then adds each batch's rows as `ref_logps`."""
        array = np.asarray(logps)
        if array.shape != (self.num_pairs, 2):
            raise SftuneError(
                f"reference log-probs for {self.path}: shape {array.shape}, expected "
                f"({self.num_pairs}, 2) (one chosen and one rejected value per pair)"
            )
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise SftuneError(
                f"reference log-probs for {self.path}: pair {bad} (line "
                f"{int(self.pair_lines[bad])}) is not finite; recompute the reference pass"
            )
        self._ref = array.astype(np.float64, copy=True)

    def sample_records(self, n: int) -> list[Pair]:
        """`n` of this dataset's pairs, evenly spaced in file order, re-read from the file
        (all of them when there are fewer than n); a held-out set samples held-out pairs."""
        order = np.argsort(self.pair_indices, kind="stable")
        count = min(max(n, 0), len(order))
        lines = [int(self.pair_lines[order[i * len(order) // count]]) for i in range(count)]
        return pairs_at_lines(self.path, lines, self.fields) if lines else []


def _check_arguments(tokenizer, path: Path, seq_length, truncation: str, fraction: float) -> None:
    """Fail before any work (tokenizing the file) on settings that cannot produce a dataset."""
    check_layout(seq_length, truncation)
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in [0, 1), got {fraction}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError(path, "the tokenizer has no EOS token, which ends every response")
    if not path.is_file():
        raise DataError(path, "no such file")


def _dataset_key(
    tokens: str, seq_length: int, truncation: str, shuffle: bool, seed: int, fraction, holdout
) -> str:
    """Everything the packed rows depend on: the entry's key and the settings applied after
    loading. A seed that draws nothing (no shuffle, no split) is left out, so it does not
    change the key."""
    split = fraction > 0
    settings = {
        "tokens": tokens,
        "seq_length": int(seq_length),
        "truncation": truncation,
        "shuffle": bool(shuffle),
        "seed": int(seed) if shuffle or split else None,
        "holdout": [float(fraction), bool(holdout)] if split else None,
    }
    return hashlib.blake2b(json.dumps(settings).encode(), digest_size=16).hexdigest()


def _select(
    base: TokenizedPairs, path: Path, fraction: float, holdout: bool, shuffle: bool, seed: int
):
    """The file-order indices of the pairs kept (the holdout split), in packing order."""
    pairs = select_documents(len(base), fraction, holdout, seed)
    if len(pairs) == 0:
        raise DataError(
            path,
            f"{len(base):,} usable pair(s) cannot be split by --val-fraction {fraction:g}: "
            "give --val-data, or more pairs",
        )
    if shuffle:
        pairs = np.random.default_rng((seed, _SHUFFLE_STREAM)).permutation(pairs)
    return pairs
