"""AdamW with linear warmup and cosine decay.

lr(s) = lr * (s + 1) / W                                   for s < W (W = ceil(warmup_ratio * total))
lr(s) = lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)        after, p = (s - W) / (total - W), m = min_lr_ratio
"""

from __future__ import annotations

import math

import torch

from sftune.config import OptimConfig


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: list[torch.nn.Parameter], cfg: OptimConfig, total_steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA: one kernel for all parameters) and its warmup + cosine schedule.

    Weight decay skips 1-D tensors (norm weights, biases), as in GPT-2 / nanoGPT.
    """
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
    warmup = warmup_steps(total_steps, cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio)
    )
    return opt, sched
