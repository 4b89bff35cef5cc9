"""Divergence: a non-finite loss, gradient norm, validation loss or weight stops a run before
anything is saved from it; a loss far above its recent trend is flagged.

The loop checks each logged step's loss and gradient norm (train/loop.py `flush`; a GPU logs
every --log-every steps) and each validation loss, and every save (a checkpoint, final/) first
flushes the unlogged steps and checks the trainable weights (`nonfinite_parameters`, one host
synchronisation), so every checkpoint a run writes is finite. The stop message names the newest
checkpoint older than the weights found bad: step N's loss comes from step N-1's weights, so a
checkpoint of step N-1 is finite but gave the non-finite loss.

A loss spike (`LossSpikes`): a step loss above max(3 x m, m + 1), where m is the median loss of
the last 20 steps (from the second step on: a too-high --lr often blows up at step 2). The
median ignores a few outliers, and a rise that lasts becomes the new trend; the ratio follows
the loss's scale, and the one-nat floor keeps a loss near 0 from calling a small absolute change
a spike. The run goes on (a spike often recovers, though not always to a useful model); the row
of that step in metrics.jsonl gets `"loss_spike": true` and the console a warning line.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch

from sftune.errors import SftuneError
from sftune.train import distributed

SPIKE_RATIO = 3.0  # times the recent median
SPIKE_MARGIN = 1.0  # nats above the recent median, at least
SPIKE_WINDOW = 20  # recent steps the median is taken over
SPIKE_MIN_HISTORY = 1  # steps seen before one is called a spike


class Diverged(SftuneError):
    """A non-finite loss, gradient norm or weight: the run stops without saving it.

    `weights_step`: the optimizer step after which the weights were found bad (a step's loss and
    gradient come from the weights of the step before), so that an older checkpoint is named."""

    def __init__(self, message: str, weights_step: int) -> None:
        super().__init__(message)
        self.weights_step = weights_step


class LossSpikes:
    """The recent step losses; `check(loss)` says whether a loss is a spike above them."""

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def check(self, loss: float) -> float | None:
        """The recent median when `loss` spikes above it, else None; `loss` joins the recent
        ones either way (a lasting rise becomes the new trend)."""
        median = statistics.median(self.recent) if len(self.recent) >= SPIKE_MIN_HISTORY else None
        self.recent.append(loss)
        if median is not None and loss > max(SPIKE_RATIO * median, median + SPIKE_MARGIN):
            return median
        return None


@torch.no_grad()
def nonfinite_parameters(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity on any rank (a collective:
    every rank calls it); one host synchronisation.

    Frozen parameters (a LoRA base) are not checked: training never changes them. Under FSDP
    each rank checks its shards; a rank's shard may be empty.
    """
    named = [
        (n, distributed.local_tensor(p)) for n, p in module.named_parameters() if p.requires_grad
    ]
    bad = torch.zeros(len(named), device=device)
    held = [i for i, (_, t) in enumerate(named) if t.numel()]
    if held:
        # The largest |value| of each tensor in one pass: NaN where any is NaN, inf where any is inf.
        maxima = torch._foreach_norm([named[i][1] for i in held], float("inf"))
        finite = torch.stack([m.float().to(device) for m in maxima]).isfinite()
        bad[held] = (~finite).float()
    bad = distributed.all_reduce_sum(bad)
    return [named[i][0] for i, b in enumerate(bad.tolist()) if b]


def check_weights(module: torch.nn.Module, device: torch.device, step: int) -> None:
    """Raises Diverged where a trainable weight is not finite after optimizer step `step`."""
    bad = nonfinite_parameters(module, device)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise Diverged(f"non-finite weights after step {step} ({bad[0]}{more})", step)
