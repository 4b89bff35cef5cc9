"""Pack preference pairs into fixed-length rows as `prompt | chosen | rejected`, the prompt once.

The pair analogue of `packing.py`'s `packing="whole"`. The input is token ids (the rendering,
templates and EOS, is done before): per pair a prompt p (P tokens), a chosen response c (C) and
a rejected response r (R). DPO needs log p(c | p) and log p(r | p). The peers (TRL, and
LLaMA-Factory's packer) feed two sequences, p c and p r, so every prompt is computed twice. Here
each pair is laid out once, p c r, and the attention mask lets r see p but never c, with r's
positions continuing from p's end. Every token of r then gets exactly the context and the
positions it has in the sequence p r, so the log-probs are those of the two sequences, and the
prompt costs its tokens once. tests/test_pair_packing.py checks it on a tiny random Llama in
float64: the per-pair sums from packed rows (sdpa with the bool mask) are 3.6e-15 from those of
the separate sequences; through eager with the additive mask 5.7e-8 (eager's softmax is fp32);
through flex_attention the same as sdpa. On CPU, transformers compiles flex_attention and the
compiled CPU kernel refuses fp64, so the fp64 test runs torch's uncompiled flex_attention; the
compiled CPU kernel runs in fp32 (3.8e-6 abs, 1.8e-7 rel from the fp32 separate sequences).

A worked example, seq_length = 8. Pair 0: p = A B, c = c1 c2, r = r1 r2 r3 (7 tokens); pair 1:
p = D, c = d1, r = e1 e2 (4 tokens). Pair 1 does not fit in the last token of row 0, so it
starts row 1 (pairs are never split across rows); the rest of a row is padding `_`:

    row 0         index      0  1  2  3  4  5  6  7
                  input_ids  A  B  c1 c2 r1 r2 r3 _
                  position   0  1  2  3  2  3  4  0       r1 continues from B (2), not from c2
                  segment    0  0  1  1  2  2  2  -1      3 * pair + part: 0 prompt, 1 chosen,
                  pair       0  0  0  0  0  0  0  -1      2 rejected; -1 padding
                  source     -1 -1 1  2  1  4  5  -1      the output that predicts this token

    row 1         input_ids  D  d1 e1 e2 _  _  _  _
                  position   0  1  1  2  0  0  0  0
                  segment    3  4  5  5  -1 -1 -1 -1
                  source     -1 0  0  2  -1 -1 -1 -1

The targets: a plain shifted `labels` array (labels[i] = the token that output i predicts)
cannot hold this layout, because the prompt's last output (B, index 1) predicts two tokens: c1
in p c and r1 in p r. So the targets are stored at the scored token instead: a response token t
at index i is scored as log_softmax(logits[source[i]])[input_ids[i]], where source[i] is i - 1,
except for the first rejected token, whose source is the prompt's last token. Prompt and
padding tokens are not scored (source -1), nor, given `chosen_mask` / `rejected_mask`, the
untrained tokens of a response (a user or tool turn inside a chat response: context, as SFT's
--train-on assistant leaves it). `PackedPairs.targets(rows)` flattens this into
gather indices for a head that only sees the scored outputs (the chunked linear + log-softmax:
prompt outputs never reach the head), and `sum_by_pair` adds the per-token log-probs up per
pair and side.

The attention rule (`dense_mask`, `flex_mask_mod`; row 0 above, 1 = may attend, query down,
key across):

              A  B  c1 c2 r1 r2 r3 _
          A   1  .  .  .  .  .  .  .
          B   1  1  .  .  .  .  .  .
          c1  1  1  1  .  .  .  .  .
          c2  1  1  1  1  .  .  .  .
          r1  1  1  .  .  1  .  .  .       the rejected tokens never see c1 c2
          r2  1  1  .  .  1  1  .  .
          r3  1  1  .  .  1  1  1  .
          _   .  .  .  .  .  .  .  1       padding sees only itself

A token attends within its pair, causally; chosen tokens to the prompt and earlier chosen
tokens; rejected tokens to the prompt and earlier rejected tokens. A padding token attends to
itself alone: a query row with nothing to attend to would give NaN from the softmax, and a NaN
output poisons the real tokens in the next layer (0 * NaN in the weighted sum of values).

How the model takes the mask (transformers 5, read in `masking_utils.py`): `create_causal_mask`
returns an `attention_mask` of 4 dimensions as it is, so the rule reaches the attention function
unchanged. What that function wants differs: `sdpa` passes it to
`scaled_dot_product_attention` as `attn_mask`, where a bool mask means True = attend (or a float
mask is added to the scores); `eager` adds it to the scores, so it needs the additive float form
(0 where allowed, the dtype's minimum elsewhere; note eager's softmax runs in fp32 even for fp64
models); `flex_attention` takes a `BlockMask` built from `flex_mask_mod` (`flex_block_mask`).
`attention_mask_4d(segment)` gives the bool or the additive form. Always pass the
`position_ids`: with a 4D mask transformers does not derive them. The varlen path of flash
attention (`cu_seqlens`) cannot express "r skips c" and is not used for pairs.

Truncation (`truncation=`). A pair longer than seq_length is:

* `"refuse"`: one line naming the pair's file and line (`path`, `lines`), the default;
* `"keep-start"`: the prompt is kept whole and the responses' tails are cut, the longer one
  first, until the pair fits (each keeps at least one token; a cut response loses its EOS). A
  prompt that leaves fewer than two tokens of room is refused: use keep-end;
* `"keep-end"`: the prompt's head is cut (its BOS and first tokens go, at least its last token
  stays); only if the two responses alone do not fit next to one prompt token are their tails
  cut as well, the longer one first.

`stats` counts the pairs, rows, real and padding tokens, the pairs cut (`truncated`, of which
`prompt_cut` lost prompt tokens and `responses_cut` response tokens), and the prompt tokens that
a two-sequence layout would have fed again (`prompt_tokens_saved`); `summary(stats)` is its line.

    >>> import numpy as np
    >>> ids = lambda *t: np.array(t)
    >>> packed = pack_pairs([ids(1, 2), ids(7)], [ids(3, 4), ids(8)], [ids(5, 6, 9), ids(10, 11)],
    ...                     seq_length=8, pad_id=0)
    >>> packed.input_ids.tolist()
    [[1, 2, 3, 4, 5, 6, 9, 0], [7, 8, 10, 11, 0, 0, 0, 0]]
    >>> packed.source[0].tolist()
    [-1, -1, 1, 2, 1, 4, 5, -1]

How a trainer uses it, per micro-batch of rows (row order is the sampler's; shuffle the pairs
before packing, as SFT shuffles documents):

    b, t = packed.batch(rows), packed.targets(rows)                 # numpy int64
    hidden = model.model(input_ids=..., position_ids=b["position_ids"],
                         attention_mask=flex_block_mask(segment_on_device)).last_hidden_state
    h = hidden.flatten(0, 1)[t["source"]]                           # only the scored outputs
    token_logps = <chunked head: log_softmax(h @ W.T)[range, t["target"]]>
    logps = sum_by_pair(token_logps, t["pair"], t["side"], len(t["pairs"]))   # (n, 2)
    ref = cached_reference_logps[t["pairs"]]                        # same (n, 2) layout

Token counts per pair and side (IPO, SimPO average per token) are
sum_by_pair(ones, t["pair"], t["side"], n). One numerical note for fp64 tests of the whole
step: transformers' LlamaRMSNorm rounds through fp32 even in fp64 models, so gradients of
packed pairs (a prompt token's chosen and rejected branches summed before that rounding) and
of separate sequences (summed after it) differ by ~1e-7 relative; the forward is per token and
agrees to 1e-15. Compare packed with packed (accumulation, world size), or run the norm in the
model's dtype as tests/test_pair_packing.py does.

This module imports numpy only; the torch helpers import torch when called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftune.errors import ConfigError, DataError

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # segment % 3; a padding token's segment is PAD
PAD = -1
TRUNCATION = ("refuse", "keep-start", "keep-end")
_BLOCK = 8192  # pairs written per numpy step, to bound the index memory
LONG_MASK = 8192  # tokens per row past which a CUDA BlockMask is built compiled


@dataclass(frozen=True)
class PackedPairs:
    """Rows of packed pairs (see the module doc): four (rows, seq_length) int32 arrays and stats.

    `segment` is 3 * pair + part (PROMPT, CHOSEN, REJECTED) with `pair` the index of the pair in
    the input lists, PAD (-1) for padding; `source` is the index in the row of the output that
    predicts a response token, -1 for tokens that are not scored.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    segment: np.ndarray
    source: np.ndarray
    stats: dict[str, int]

    @property
    def pair(self) -> np.ndarray:
        """Which pair each token belongs to (-1 for padding): segment // 3."""
        return np.where(self.segment >= 0, self.segment // 3, -1)

    def batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows` as int64 arrays: input_ids, position_ids, segment, source, pair."""
        rows = np.asarray(rows, dtype=np.int64)
        out = {
            name: getattr(self, name)[rows].astype(np.int64)
            for name in ("input_ids", "position_ids", "segment", "source")
        }
        out["pair"] = np.where(out["segment"] >= 0, out["segment"] // 3, -1)
        return out

    def targets(self, rows: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The scored tokens of `rows`, flat, for a head that sees only the outputs it needs.

        With `hidden` the model's last hidden states of those rows flattened to
        (len(rows) * seq_length, d): the log-prob of scored token k is
        log_softmax(head(hidden[source[k]]))[target[k]]; it belongs to pair `pair[k]` of the
        batch (0 .. len(pairs) - 1) and side `side[k]` (0 chosen, 1 rejected). `pairs` holds the
        input indices of those batch pairs, ascending (to look up cached reference log-probs).
        """
        b = self.batch(rows)
        width = b["input_ids"].shape[1]
        scored = b["source"] >= 0
        row_of = np.nonzero(scored)[0]
        pairs, local = np.unique(b["pair"][scored], return_inverse=True)
        return {
            "source": row_of * width + b["source"][scored],
            "target": b["input_ids"][scored],
            "pair": local.reshape(-1),
            "side": (b["segment"][scored] % 3 == REJECTED).astype(np.int64),
            "pairs": pairs,
        }


def pack_pairs(
    prompts: Sequence[np.ndarray],
    chosen: Sequence[np.ndarray],
    rejected: Sequence[np.ndarray],
    seq_length: int,
    *,
    pad_id: int,
    truncation: str = "refuse",
    path: str | os.PathLike | None = None,
    lines: Sequence[int] | None = None,
    chosen_mask: Sequence[np.ndarray] | None = None,
    rejected_mask: Sequence[np.ndarray] | None = None,
) -> PackedPairs:
    """Pairs i = (prompts[i], chosen[i], rejected[i]) placed whole, in order, into rows.

    A pair that does not fit in the rest of a row starts the next one. `path` and `lines`
    (the file and each pair's line in it) only serve the error messages. `chosen_mask` and
    `rejected_mask` (bool, one per response token; `PairEncoder`'s masks) leave the untrained
    tokens of a response in the row but unscored (source -1): a chat template's newline after
    its end-of-turn token, a tool message inside a response. Without them every response token
    is scored. A pair cut to fit must keep a scored token on each side.
    """
    check_layout(seq_length, truncation)
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError("prompts, chosen and rejected must have one entry per pair")
    masks = _response_masks(chosen, rejected, chosen_mask, rejected_mask)
    kept, scored = [], []
    stats = dict.fromkeys(("truncated", "prompt_cut", "responses_cut"), 0)
    for i, parts in enumerate(zip(prompts, chosen, rejected, strict=True)):
        parts = [np.asarray(x).reshape(-1) for x in parts]
        where = (str(path or "<pairs>"), None if lines is None else lines[i])
        fitted = _fit(parts, seq_length, truncation, where)
        if masks is not None:
            scored.append(_scored(fitted, masks[0][i], masks[1][i], seq_length, where))
        cut_p = len(fitted[0]) < len(parts[0])
        cut_r = len(fitted[1]) + len(fitted[2]) < len(parts[1]) + len(parts[2])
        stats["truncated"] += cut_p or cut_r
        stats["prompt_cut"] += cut_p
        stats["responses_cut"] += cut_r
        kept.append(fitted)
    lengths = np.array([sum(len(x) for x in parts) for parts in kept], dtype=np.int64)
    starts, rows = _place(lengths, seq_length)
    shape = (rows, seq_length)
    out = PackedPairs(
        input_ids=np.full(shape, pad_id, np.int32),
        position_ids=np.zeros(shape, np.int32),
        segment=np.full(shape, PAD, np.int32),
        source=np.full(shape, -1, np.int32),
        stats={},
    )
    sizes = np.array([[len(x) for x in parts] for parts in kept], dtype=np.int64).reshape(-1, 3)
    for lo in range(0, len(kept), _BLOCK):
        hi = min(lo + _BLOCK, len(kept))
        flags = None if masks is None else np.concatenate(scored[lo:hi])
        _write(out, lo, kept[lo:hi], sizes[lo:hi], starts[lo:hi], flags)
    real = int(lengths.sum())
    stats.update(
        pairs=len(kept),
        rows=rows,
        seq_length=seq_length,
        tokens=real,
        padding=rows * seq_length - real,
        prompt_tokens_saved=sum(len(parts[0]) for parts in kept),
    )
    out.stats.update(stats)
    return out


def check_layout(seq_length: Any, truncation: str) -> None:
    """A row length and a truncation rule that can hold pairs (one-line ConfigErrors)."""
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation: {truncation!r} is not one of {', '.join(TRUNCATION)}")
    if isinstance(seq_length, bool) or not isinstance(seq_length, (int, np.integer)):
        raise ConfigError(f"seq_length must be an integer >= 3, got {seq_length!r}")
    if seq_length < 3:  # one prompt token and one token of each response
        raise ConfigError(f"seq_length must be an integer >= 3 for pairs, got {seq_length}")


def summary(stats: dict[str, int]) -> str:
    """The build's line: what the rows hold and how many pairs were cut."""
    s = stats
    return (
        f"{s['pairs']:,} pair{'s' if s['pairs'] != 1 else ''} -> {s['rows']:,} "
        f"row{'s' if s['rows'] != 1 else ''} of {s['seq_length']} "
        f"({s['tokens']:,} tokens, {s['padding']:,} padding, {s['prompt_tokens_saved']:,} prompt "
        f"tokens computed once instead of twice); cut to fit: {s['truncated']:,} "
        f"(prompt {s['prompt_cut']:,}, responses {s['responses_cut']:,})"
    )


def _fit(
    parts: list[np.ndarray], m: int, truncation: str, where: tuple[str, int | None]
) -> list[np.ndarray]:
    """(prompt, chosen, rejected) cut to at most m tokens together, as `truncation` says."""
    p, c, r = parts
    for name, x in zip(("prompt", "chosen", "rejected"), parts, strict=True):
        if len(x) == 0:
            raise DataError(where[0], f"the {name} has no tokens", line=where[1])
    total = len(p) + len(c) + len(r)
    if total <= m:
        return parts
    if truncation == "refuse" or (truncation == "keep-start" and len(p) > m - 2):
        what = (
            f"a pair of {total:,} tokens (prompt {len(p):,}, chosen {len(c):,}, rejected "
            f"{len(r):,}) is too long for one row of --seq-length {m}"
        )
        fix = "--truncation keep-start or keep-end" if truncation == "refuse" else "keep-end"
        if truncation == "keep-start":
            what += ", and its prompt leaves no room for the responses"
        raise DataError(where[0], f"{what}: use {fix}, or a longer --seq-length", line=where[1])
    if truncation == "keep-end":
        p = p[len(p) - max(1, min(len(p), m - len(c) - len(r))) :]
    n_c, n_r = _cut_responses(len(c), len(r), m - len(p))
    return [p, c[:n_c], r[:n_r]]


def _response_masks(chosen, rejected, chosen_mask, rejected_mask) -> tuple | None:
    if chosen_mask is None and rejected_mask is None:
        return None
    if chosen_mask is None or rejected_mask is None:
        raise ValueError("chosen_mask and rejected_mask go together")
    for tokens, mask in ((chosen, chosen_mask), (rejected, rejected_mask)):
        if len(mask) != len(tokens) or any(
            np.size(m) != np.size(t) for t, m in zip(tokens, mask, strict=True)
        ):
            raise ValueError("a response mask must have one flag per response token")
    return chosen_mask, rejected_mask


def _scored(fitted: list, c_mask, r_mask, m: int, where: tuple[str, int | None]) -> np.ndarray:
    """The pair's flat scored flags (the prompt never is), its responses' masks cut as its
    tokens were (always their tails)."""
    p, c, r = (len(x) for x in fitted)
    c_mask = np.asarray(c_mask, bool).reshape(-1)[:c]
    r_mask = np.asarray(r_mask, bool).reshape(-1)[:r]
    for name, mask in (("chosen", c_mask), ("rejected", r_mask)):
        if not mask.any():
            raise DataError(
                where[0],
                f"the {name} response has no trained token left after cutting the pair to "
                f"--seq-length {m}: use a longer --seq-length",
                line=where[1],
            )
    return np.concatenate([np.zeros(p, bool), c_mask, r_mask])


def _cut_responses(c: int, r: int, budget: int) -> tuple[int, int]:
    """Lengths of the two responses within `budget` tokens (>= 2): the longer is cut first; if
    both must go, they get half each, the odd token to the longer (the chosen on a tie).

        >>> _cut_responses(3, 9, 8), _cut_responses(6, 9, 8), _cut_responses(9, 6, 7)
        ((3, 5), (4, 4), (4, 3))
    """
    if c + r <= budget:
        return c, r
    short = min(c, r)
    if short <= budget // 2:
        return (c, budget - c) if c == short else (budget - r, r)
    half, odd = divmod(budget, 2)
    return (half + odd, half) if c >= r else (half, half + odd)


def _place(lengths: np.ndarray, m: int) -> tuple[np.ndarray, int]:
    """(where each pair starts in the flattened rows, rows): in order, a pair that does not fit
    in the rest of a row starts the next one (all fit in one row).

        >>> _place(np.array([7, 4, 4]), 8)
        (array([ 0,  8, 12]), 2)
    """
    starts = np.empty(len(lengths), dtype=np.int64)
    row, fill = 0, 0
    for j, n in enumerate(lengths.tolist()):
        if fill + n > m:
            row, fill = row + 1, 0
        starts[j] = row * m + fill
        fill += n
    return starts, row + (fill > 0)


def _write(
    out: PackedPairs,
    first: int,
    kept: list,
    sizes: np.ndarray,
    starts: np.ndarray,
    scored: np.ndarray | None = None,
) -> None:
    """Pairs first, first + 1, ... (their parts `kept`, lengths `sizes` (n, 3), flat `starts`)
    into the rows: tokens, positions, segments and sources, in one numpy step per array.
    `scored` (flat over the pairs' tokens): which response tokens are scored (None: all)."""
    p, c = sizes[:, 0], sizes[:, 1]
    n = sizes.sum(axis=1)
    w = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # offset within the pair
    p, c = np.repeat(p, n), np.repeat(c, n)
    part = (w >= p).astype(np.int64) + (w >= p + c)
    flat = np.repeat(starts, n) + w
    tokens = np.concatenate([x for parts in kept for x in parts])
    out.input_ids.reshape(-1)[flat] = tokens
    out.position_ids.reshape(-1)[flat] = w - c * (part == REJECTED)  # r continues from p's end
    out.segment.reshape(-1)[flat] = 3 * np.repeat(np.arange(first, first + len(n)), n) + part
    # The output before a response token predicts it; the first rejected token's "before" is
    # the prompt's last token, c + 1 back.
    back = np.where(w == p + c, c + 1, 1)
    column = flat % out.input_ids.shape[1]
    unscored = part == PROMPT if scored is None else ~scored
    out.source.reshape(-1)[flat] = np.where(unscored, -1, column - back)


def dense_mask(segment: np.ndarray) -> np.ndarray:
    """(rows, L, L) bool, True where query q may attend to key k (the rule in the module doc)."""
    seg = np.asarray(segment)
    q, k = seg[..., :, None], seg[..., None, :]
    n = seg.shape[-1]
    causal = np.arange(n)[None, :] <= np.arange(n)[:, None]
    same_pair = (q >= 0) & (q // 3 == k // 3)
    visible = (k % 3 == PROMPT) | (k % 3 == q % 3)
    return (same_pair & visible & causal) | np.eye(n, dtype=bool)


def attention_mask_4d(segment: Any, dtype: Any = None) -> Any:
    """`dense_mask` as the (rows, 1, L, L) torch `attention_mask` transformers passes through:
    bool (True = attend) for sdpa when `dtype` is None, else additive in `dtype` (0 or the
    dtype's minimum) for eager."""
    import torch

    if isinstance(segment, torch.Tensor):  # on its device: the rule of dense_mask, in torch
        q, k = segment[..., :, None], segment[..., None, :]
        n = segment.shape[-1]
        pos = torch.arange(n, device=segment.device)
        causal = pos[None, :] <= pos[:, None]
        same_pair = (q >= 0) & (q // 3 == k // 3)
        visible = (k % 3 == PROMPT) | (k % 3 == q % 3)
        eye = torch.eye(n, dtype=torch.bool, device=segment.device)
        mask = ((same_pair & visible & causal) | eye)[:, None]
    else:
        mask = torch.from_numpy(dense_mask(segment))[:, None]
    if dtype is None:
        return mask
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


def flex_mask_mod(segment: Any):
    """FlexAttention `mask_mod(b, h, q, k)` for the rule, from a (rows, L) torch `segment`."""

    def mask_mod(b, h, q_idx, kv_idx):
        sq, sk = segment[b, q_idx], segment[b, kv_idx]
        same_pair = (sq >= 0) & (sq // 3 == sk // 3)
        visible = (sk % 3 == PROMPT) | (sk % 3 == sq % 3)
        return (same_pair & visible & (kv_idx <= q_idx)) | (kv_idx == q_idx)

    return mask_mod


def flex_block_mask(segment: Any):
    """A `BlockMask` for the rows of `segment` (torch, (rows, L)), to pass as `attention_mask`
    to a model loaded with attn_implementation="flex_attention"."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, n = segment.shape
    # Uncompiled, create_block_mask evaluates the rule densely (rows x n x n) before it
    # blocks it: fine at a few thousand tokens, 1 G entries a row at 32K. Compiled, it works
    # block by block (transformers does the same for its long masks); CPU tests stay eager.
    compiled = segment.is_cuda and n > LONG_MASK
    return create_block_mask(
        flex_mask_mod(segment), rows, None, n, n, device=str(segment.device), _compile=compiled
    )


def sum_by_pair(token_logps: Any, pair: Any, side: Any, num_pairs: int) -> Any:
    """(num_pairs, 2) torch: the per-token log-probs of `targets()` summed per pair, column 0
    the chosen response, column 1 the rejected one (differentiable: an index_add)."""
    import torch

    out = torch.zeros(num_pairs * 2, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, pair * 2 + side, token_logps).view(num_pairs, 2)
