"""One optimizer step: micro-batches in, token-weighted loss, backward, clip, AdamW, schedule.

Every rank counts the trained tokens of its micro-batches, one all-reduce gives the step's
global count N, and each micro-batch contributes sum(CE) / N to the loss, so accumulation and
the number of ranks never change the gradient. A preference objective counts pairs (and chosen
tokens) the same way: the step's loss is the mean over all its pairs. Nothing here synchronises the host (no
`.item()`): the loop reads the returned tensors when it logs.

    loss_share, grad_norm, counts, metric_sums = train_step(
        module, optimizer, scheduler, batches, objective=objective, world_size=1, grad_clip=1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sftune.objectives.preference import TokenCrossEntropy
from sftune.train import distributed


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def flatten_for_varlen(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T) -> (1, B*T): flash-attn's variable-length path reads documents off position_ids."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def load_batch(dataset, indices, device: torch.device, varlen: bool) -> dict[str, torch.Tensor]:
    """Items `indices` of a packed dataset as one batch on `device`."""
    batch = to_device(dataset.get_batch(indices), device)
    return flatten_for_varlen(batch) if varlen else batch


def micro_batches(
    dataset, indices, micro_batch_size: int, device: torch.device, varlen: bool
) -> list[dict[str, torch.Tensor]]:
    """This rank's items of one optimizer step, cut into micro-batches on `device`."""
    return [
        load_batch(dataset, indices[lo : lo + micro_batch_size], device, varlen)
        for lo in range(0, len(indices), micro_batch_size)
    ]


def train_step(
    module: torch.nn.Module,
    optimizer,
    scheduler,
    batches: Sequence[dict[str, torch.Tensor]],
    *,
    objective=None,
    world_size: int = 1,
    grad_clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns (this rank's share of the step loss, grad norm, the step's
    global counts, this rank's metric sums) as tensors; the shares of all ranks sum to the
    step's loss. `objective` (objectives/preference.py; default: SFT's token-weighted CE) says what
    the counts are (trained tokens; for pairs: pairs and chosen tokens) and computes each
    micro-batch's share of the loss from them.

    `optimizer` is sftune's AdamW (`clip_and_step`); grad_clip 0 turns clipping off.
    """
    objective = objective or TokenCrossEntropy()
    counts = torch.stack([objective.counts(b) for b in batches]).sum(0)
    global_counts = distributed.all_reduce_sum(counts)
    losses, sums = [], []
    for i, b in enumerate(batches):
        distributed.set_grad_sync(module, i == len(batches) - 1)
        loss, metric_sums = objective.loss(module, b, global_counts, world_size)
        loss.backward()
        losses.append(loss.detach())
        sums.append(metric_sums)
    grad_norm = optimizer.clip_and_step(grad_clip if grad_clip > 0 else float("inf"))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    share = torch.stack(losses).sum() / world_size  # the loss's dtype
    return share, grad_norm, global_counts, torch.stack(sums).sum(0)
