"""The memory plan's decision, as a pure function over measurements: which memory levers
(activation checkpointing, offloaded checkpoints, tiled MLP) and which micro-batch a run uses
within its GPU budget, and, where nothing fits, the longest sequence that would.

`train/module.py` `plan_memory` measures on the GPU (it applies a candidate to the model and
probes); this module only decides, so the CPU tests drive it with made-up measurements:

    cands = candidates(checkpointing=False, offload="auto", tiled_mlp="auto")
    # [plain, checkpointing, checkpointing + tiled MLP, activation offload + tiled MLP]
    choice = decide(cands, per_rank_batch=1, seq_length=131072, budget_bytes=24 * 2**30,
                    measure=probe)      # probe.fit(c) -> Fit | None, probe.speed(c, mb),
                                        # probe.peak(c, seq) -> bytes | None
    choice.candidate, choice.micro_batch, choice.note

Candidates are tried fastest first: plain > checkpointing > checkpointing + tiled MLP >
offload + tiled MLP (each lever costs time: a recompute, chunked GEMMs, PCIe copies). The first
that fits a micro-batch of at least half the per-rank batch wins at once; where a later one
fits a larger micro-batch, both are timed and the faster wins (accumulation over small
micro-batches can be slower than a recompute over large ones).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

# The probe's margin: a candidate fits when its peak stays under this share of the budget
# (the rest is for the allocator's fragmentation and what the first real steps add).
FIT_SHARE = 0.92
GIB = 2**30


class Candidate(NamedTuple):
    checkpointing: bool
    offload: bool  # offloaded checkpoints (implies checkpointing)
    tiling: bool  # tiled MLP

    @property
    def name(self) -> str:
        parts = ["activation offload" if self.offload else "checkpointing"]
        if not self.checkpointing:
            parts = []
        if self.tiling:
            parts.append("tiled MLP")
        return " + ".join(parts) or "plain"


class Fit(NamedTuple):
    micro_batch: int  # the largest that fits
    peak_bytes: int  # its measured peak


class Measure(Protocol):
    def fit(self, cand: Candidate) -> Fit | None: ...  # None: not even the smallest

    def speed(self, cand: Candidate, micro_batch: int) -> float: ...  # tokens/s fwd+bwd

    # at the smallest micro-batch tried (1, or the one given); None: out of memory
    def peak(self, cand: Candidate, seq_length: int) -> int | None: ...


class Choice(NamedTuple):
    candidate: Candidate
    micro_batch: int
    note: str
    peak_bytes: int = 0  # the probe's peak at that micro-batch (choose_keep's headroom)


class NothingFits(Exception):
    """Not even the smallest micro-batch fits with every lever allowed; `message` is the
    one-line error."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# Fastest first. Offload without tiling appears only where tiling is off (below).
_ORDER = (
    Candidate(False, False, False),
    Candidate(True, False, False),
    Candidate(True, False, True),
    Candidate(True, True, True),
)


def candidates(checkpointing: bool, offload: str, tiled_mlp: str) -> list[Candidate]:
    """The candidates the settings allow, fastest first.

    --activation-checkpointing drops plain; --activation-offload on keeps only offloaded ones,
    off drops them; --tiled-mlp on tiles every one, off none; auto leaves each to the plan.

    >>> [c.name for c in candidates(False, "auto", "auto")]
    ['plain', 'checkpointing', 'checkpointing + tiled MLP', 'activation offload + tiled MLP']
    >>> [c.name for c in candidates(False, "auto", "off")]
    ['plain', 'checkpointing', 'activation offload']
    >>> [c.name for c in candidates(True, "on", "auto")]
    ['activation offload', 'activation offload + tiled MLP']
    """
    out: list[Candidate] = []
    for c in _ORDER:
        tiling = {"on": True, "off": False}.get(tiled_mlp, c.tiling)
        off = {"on": True, "off": False}.get(offload, c.offload)
        c = Candidate(c.checkpointing or checkpointing or off, off, tiling)
        if c not in out:
            out.append(c)
    return out


def decide(
    cands: list[Candidate],
    *,
    per_rank_batch: int,
    seq_length: int,
    budget_bytes: int,
    measure: Measure,
    settings_off: tuple[str, ...] = (),
    micro_batch: int = 0,
) -> Choice:
    """The candidate and micro-batch to train with (see the module doc), probing lazily: a
    candidate is measured only when every faster one fits too small a micro-batch, and timed
    only against a faster one that fits a smaller micro-batch. Raises NothingFits, with the
    longest sequence that would fit (`longest_fit`), when none fits micro-batch 1.

    `micro_batch`: a --micro-batch-size given (0: auto): the levers are then planned for it
    alone, and the first candidate that fits it wins.

    `settings_off`: what would allow the levers the flags ruled out (e.g. "--tiled-mlp auto"),
    named in the error as what else to try.
    """
    gib = budget_bytes / GIB
    best: tuple[Candidate, Fit] | None = None
    speeds: dict[Candidate, float] = {}
    tried: list[str] = []
    for cand in cands:
        if best is not None and 2 * best[1].micro_batch >= (micro_batch or per_rank_batch):
            break
        fit = measure.fit(cand)
        if fit is None:
            tried.append(f"{cand.name}: nothing fits")
            continue
        tried.append(
            f"{cand.name}: micro-batch {fit.micro_batch} (peak {fit.peak_bytes / GIB:.1f} GiB)"
        )
        if best is None:
            best = (cand, fit)
            continue
        if fit.micro_batch <= best[1].micro_batch:
            continue  # a slower lever that fits no more is never worth it
        old, new = best[0], cand
        if old not in speeds:
            speeds[old] = measure.speed(old, best[1].micro_batch)
        speeds[new] = measure.speed(new, fit.micro_batch)
        tried[-1] += f", {speeds[new]:,.0f} tokens/s against {speeds[old]:,.0f}"
        if speeds[new] > speeds[old]:
            best = (cand, fit)
    if best is None:
        raise NothingFits(
            nothing_fits_message(
                cands[-1], seq_length, budget_bytes, measure, settings_off, micro_batch or 1
            )
        )
    cand, fit = best
    why = "; ".join(tried)
    how = "as given" if micro_batch else "largest that fits"
    note = (
        f"memory plan within {gib:.1f} GiB at {seq_length:,} tokens: {cand.name}, micro-batch "
        f"{fit.micro_batch} ({how}; {why})"
    )
    return Choice(cand, fit.micro_batch, note, fit.peak_bytes)


# ----------------------------------------------------------------------------- offload: keep


class Keep(NamedTuple):
    keep: int  # the last layers whose inputs stay on the GPU
    host_bytes: int  # what the others' inputs take on the host (all this host's ranks)
    note: str


def choose_keep(layers: int, per_layer: int, headroom: int, host_room: int, ranks: int = 1) -> Keep:
    """With offload chosen: keep as many last layers' inputs on the GPU as its headroom holds,
    and never fewer than the host's memory needs. Raises NothingFits where both cannot be.

    The estimate, from the offload probe (every input offloaded): `headroom` is the budget's
    fit share less that probe's peak. A kept input lives from its layer's forward to its
    backward, across the peak (the loss and the start of backward), so each kept layer adds
    one layer input (`per_layer` bytes: micro-batch x seq x hidden x dtype) to it; one more
    is set aside for the highest offloaded input, which the kept layers' backward prefetches.
    `host_room`: the host bytes offload may take (offload.host_room), shared by `ranks`.

    >>> choose_keep(32, 4 * GIB, 30 * GIB, 107 * GIB).keep  # 7 inputs, less one: the prefetch
    6
    >>> choose_keep(32, 4 * GIB, 200 * GIB, 107 * GIB).keep  # all of them fit the GPU
    32
    """
    gpu = layers if per_layer <= 0 else min(layers, max(0, headroom // per_layer - 1))
    need = per_layer * ranks
    host = max(0, layers - host_room // need) if need > 0 else 0
    keep = gpu  # the host needs `host` kept: at most that many, or it cannot be done
    host_bytes = (layers - keep) * need
    room = f"GPU headroom {max(headroom, 0) / GIB:.1f} GiB, {per_layer / GIB:.2f} GiB per input"
    if host > gpu:
        raise NothingFits(
            f"activation offload: the host's memory ({host_room / GIB:.1f} GiB for offloaded "
            f"inputs) holds only {layers - host} of the {layers} layer inputs and the GPU's "
            f"headroom only {gpu} of the rest ({room}); use a shorter --seq-length, a smaller "
            "--micro-batch-size, or more GPUs"
        )
    note = (
        f"activation offload keeps the last {keep} of {layers} layer inputs on the GPU ({room}), "
        f"{host_bytes / GIB:.1f} GiB on the host ({host_room / GIB:.1f} GiB usable)"
    )
    return Keep(keep, host_bytes, note)


# ----------------------------------------------------------------------------- nothing fits


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(a, b) of peak = a + b * T through the two longest measured lengths."""
    (t1, p1), (t2, p2) = sorted(points)[-2:]
    b = (p2 - p1) / (t2 - t1)
    return p1 - b * t1, b


def longest_fit(points: list[tuple[int, int]], budget_bytes: int) -> int:
    """The longest sequence whose peak, on the line through two measured (T, peak bytes),
    stays under the probe's margin of the budget; rounded down to a multiple of 1,024 tokens
    (of 64 under 1,024); 0 when even the line's intercept (weights, optimizer) is over it.

    >>> longest_fit([(1024, 10 * 2**30), (2048, 11 * 2**30)], 24 * 2**30)  # 9 GiB + 1 MiB/token
    13312
    """
    a, b = fit_line(points)
    room = FIT_SHARE * budget_bytes - a
    if room <= 0:
        return 0
    t = int(room / b) if b > 0 else max(t for t, _ in points)
    step = 1024 if t >= 1024 else 64
    return t // step * step


def nothing_fits_message(
    leanest: Candidate,
    seq_length: int,
    budget_bytes: int,
    measure: Measure,
    settings_off: tuple[str, ...] = (),
    micro_batch: int = 1,
) -> str:
    """The one-line error: what was tried, and the longest length that fits with the leanest
    candidate, from its peaks at two shorter lengths (T/2 and T/4, halving on until two fit,
    down to T/64) on a line peak = a + b * T; the length the line gives is probed too, and
    where it does not fit, the longest that did is named instead."""
    gib = budget_bytes / GIB
    head = (
        f"out of GPU memory ({gib:.1f} GiB) even at micro-batch {micro_batch} x "
        f"{seq_length:,} tokens with {leanest.name}"
    )

    def fits(t: int) -> int | None:
        peak = measure.peak(leanest, t)
        return peak if peak is not None and peak < FIT_SHARE * budget_bytes else None

    points: list[tuple[int, int]] = []  # (tokens, peak bytes), longest first
    t = seq_length // 2
    while len(points) < 2 and t >= max(16, seq_length // 64):
        peak = fits(t)
        if peak is not None:
            points.append((t, peak))
        t //= 2
    more = f"; or try {' and '.join(settings_off)}" if settings_off else ""
    if not points:
        return (
            f"{head}, nor at {seq_length // 64:,} tokens: the weights and optimizer state alone "
            f"leave no room; use --lora/--qlora, a larger --max-memory-gib, or shard over more "
            f"GPUs{more}"
        )
    longest, how = points[0][0], f"measured at {points[0][0]:,} tokens"
    if len(points) == 2:
        a, b = fit_line(points)
        line = longest_fit(points, budget_bytes)
        how = (
            f"peak = {a / GIB:.1f} GiB + {b / 2**20:.3f} MiB per token, fitted to probes at "
            f"{points[1][0]:,} and {points[0][0]:,} tokens"
        )
        if longest < line < seq_length:  # past the probes: probed too
            peak = fits(line)
            if peak is None:
                how += f"; {line:,} itself did not fit"
            else:
                longest, how = line, how + f"; {peak / GIB:.1f} GiB at {line:,}, probed"
    return (
        f"{head}: the longest that fits is about {longest:,} tokens ({how}); use --seq-length "
        f"{longest} or less, --qlora, or a larger --max-memory-gib{more}"
    )
