"""One optimizer step: micro-batches in, token-weighted loss, backward, clip, AdamW, schedule.

Every rank counts the trained tokens of its micro-batches, one all-reduce gives the step's
global count N, and each micro-batch contributes sum(CE) / N to the loss, so accumulation and
the number of ranks never change the gradient. Nothing here synchronises the host (no
`.item()`): the loop reads the returned tensors when it logs.

    loss_share, grad_norm, n_tokens = train_step(
        module, optimizer, scheduler, batches, world_size=1, grad_clip=1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sftune.data import IGNORE_INDEX
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
    world_size: int = 1,
    grad_clip: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns (this rank's share of the step loss, grad norm, global trained
    tokens) as tensors; the shares of all ranks sum to the step's token-weighted mean loss.

    `optimizer` is sftune's AdamW (`clip_and_step`); grad_clip 0 turns clipping off.
    """
    count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).float()
    global_count = distributed.all_reduce_sum(count.clone())
    # DDP and FSDP average each gradient over the ranks, hence the world size.
    scale = world_size / global_count.clamp(min=1.0)
    losses = []
    for i, b in enumerate(batches):
        distributed.set_grad_sync(module, i == len(batches) - 1)
        loss = module(
            input_ids=b["input_ids"],
            labels=b["labels"],
            position_ids=b.get("position_ids"),
            scale=scale,
        )
        loss.backward()
        losses.append(loss.detach())
    grad_norm = optimizer.clip_and_step(grad_clip if grad_clip > 0 else float("inf"))
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).sum() / world_size, grad_norm, global_count  # the loss's dtype
