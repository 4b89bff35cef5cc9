"""AdamW (torch's, or an 8-bit one: torchao's or bitsandbytes') with linear warmup and cosine decay.

lr(s) = lr * (s + 1) / W                                   for s < W (W = ceil(warmup_ratio * total))
lr(s) = lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)        after, p = (s - W) / (total - W), m = min_lr_ratio
"""

from __future__ import annotations

import math

import torch

from sftune.config import OptimConfig
from sftune.train import distributed


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_norm_(
    params: list[torch.Tensor], max_norm: float, local_shards: bool = False
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_; with local_shards (FSDP2's DTensor gradients), the same
    on each rank's shards: their norm, one all-reduce of the squares, the same scaling, without
    DTensor's dispatch for every gradient. Returns the norm before clipping."""
    if not local_shards:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [distributed.local_tensor(p.grad) for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    norm = distributed.all_reduce_sum(norm.square()).sqrt()  # each element lives on one rank
    if grads:  # torch's scaling, as clip_grads_with_norm_ does it to .grad of parameters
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm


def _clip_then_step(
    optimizer: torch.optim.Optimizer, max_norm: float, local_shards: bool = False
) -> torch.Tensor:
    """Every `clip_and_step`: clipping of all the optimizer's gradients, then its step; returns
    the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = clip_grad_norm_(params, max_norm, local_shards)
    optimizer.step()
    return norm


def _lr_as_tensor(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict: a checkpoint may hold the learning rate as a float, where the
    step needs a tensor (compiled AdamW, torchao's AdamW8bit)."""
    for g in optimizer.param_groups:
        if not torch.is_tensor(g["lr"]):
            g["lr"] = torch.tensor(float(g["lr"]))


class AdamW(torch.optim.AdamW):
    """torch's AdamW plus `clip_and_step`: gradient-norm clipping and the update in one call.

    compiled=False: torch's fused AdamW kernel on CUDA (for-each elsewhere), clipping as
    torch.nn.utils does it. compiled=True: both under one `torch.compile`, so clipping's
    scaling and the update become a few fused passes over the parameters; this needs the
    learning rate as a tensor (the scheduler updates it in place, so nothing recompiles).

    FSDP2's parameters, gradients and moments are DTensors; the update is elementwise, so it
    runs on each rank's local shards as plain tensors (in place, so the DTensors see it), and
    the state stays DTensors for checkpoints.
    """

    def __init__(self, groups, *, compiled: bool, device: torch.device, **kw):
        if compiled:
            kw.update(foreach=True, capturable=True, lr=torch.tensor(float(kw["lr"])))
        else:
            kw.update(fused=device.type == "cuda")
        super().__init__(groups, **kw)
        self.compiled = compiled
        # FSDP2's DTensors: stepped on their local shards (benchmarks turn it off to compare).
        self.on_local_shards = any(
            distributed.is_dtensor(p) for g in self.param_groups for p in g["params"]
        )
        self._step_fn = torch.compile(self._clip_and_step) if compiled else self._clip_and_step

    def _init_group(self, group, *lists):
        """torch's, then each DTensor in the lists it filled (parameters, gradients, moments)
        replaced by its local shard."""
        out = super()._init_group(group, *lists)
        if self.on_local_shards:
            for xs in lists:
                if isinstance(xs, list):
                    xs[:] = [distributed.local_tensor(x) for x in xs]
        return out

    def _clip_and_step(self, max_norm: float) -> torch.Tensor:
        return _clip_then_step(self, max_norm, self.on_local_shards)

    def clip_and_step(self, max_norm: float) -> torch.Tensor:
        """Clips the global gradient norm to max_norm (inf: no clipping), steps, returns the
        norm before clipping."""
        return self._step_fn(max_norm)

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        if self.compiled:
            _lr_as_tensor(self)


def adamw8bit(groups, **kw) -> torch.optim.Optimizer:
    """torchao's AdamW8bit with sftune's `clip_and_step`.

    Both moments of every tensor of at least 4,096 values are stored as 8-bit codes with one
    fp32 scale per 256 values (torchao's OptimState8bit; smaller tensors keep plain moments);
    each parameter's update dequantizes, runs in fp32 and requantizes, in one compiled kernel
    per parameter shape. bf16 weights are rounded to nearest, as torch's AdamW rounds them, so
    a run is deterministic and resumes exactly. Not for FSDP2: sftune refuses it there, since
    torchao 0.17's 8-bit state fails on FSDP2's sharded parameters (tried with torch 2.13 on
    the CPU: `aten.view.dtype` is not implemented for OptimState8bit).
    """
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    class AdamW8bit(TorchaoAdamW8bit):
        clip_and_step = _clip_then_step

        def load_state_dict(self, state_dict) -> None:
            super().load_state_dict(state_dict)
            _lr_as_tensor(self)

    return AdamW8bit(groups, **kw)


def adamw8bit_bnb(groups, **kw) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit with sftune's `clip_and_step`.

    The same 8-bit scheme as torchao's (both moments as dynamic-quantization codes with an fp32
    scale per 256 values; tensors under 4,096 values keep fp32 moments), updated by one fused
    CUDA kernel per tensor (on the CPU, bitsandbytes' torch implementation). Its state is plain
    uint8 and fp32 tensors, so checkpoints resume exactly. Not for FSDP2 (refused there: its
    kernels take whole tensors, not DTensor shards).
    """
    import bitsandbytes as bnb

    class AdamW8bitBnb(bnb.optim.AdamW8bit):
        clip_and_step = _clip_then_step

    return AdamW8bitBnb(groups, **kw)


def build_optimizer(
    params: list[torch.nn.Parameter],
    cfg: OptimConfig,
    total_steps: int,
    device: torch.device,
    compiled: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused on CUDA, or compiled with clipping; or 8-bit, torchao's or bitsandbytes',
    with `cfg.optimizer`) and its warmup + cosine schedule.

    Weight decay skips 1-D tensors (norm weights, biases), as in GPT-2 / nanoGPT.
    """
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "adamw8bit":
        opt = adamw8bit(groups, **kw)
    elif cfg.optimizer == "adamw8bit-bnb":
        opt = adamw8bit_bnb(groups, **kw)
    else:
        opt = AdamW(groups, compiled=compiled, device=device, **kw)
    warmup = warmup_steps(total_steps, cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio)
    )
    return opt, sched
