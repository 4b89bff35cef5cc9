"""All distributed code in one place: process group, rank helpers, DDP and FSDP2 wrapping,
reductions, and the choice between them (`--dist`).

One process (`python -m sftune train ...`) is world size 1 of the same code path:

    torchrun --standalone --nproc-per-node 8 -m sftune train --model DIR --train-data data.jsonl
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m sftune train --model DIR --train-data data.jsonl

Two PyTorch engines, picked by `--dist` (`plan`):
- ddp: every rank holds the whole model; `torch.distributed._composable.replicate` (DDP applied
  in place, so names, state dicts and the loss module stay as they are) all-reduces the
  gradients in buckets during backward. For models whose weights, gradients and AdamW state fit
  on one GPU with room for activations: `auto` picks it then.
- fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer and then the
  root (embeddings, final norm, output projection), as torchtitan does. When the model would
  fit replicated, the layers keep their gathered parameters from forward to backward (one
  all-gather per layer and micro-batch instead of two); otherwise every layer but the last
  frees them after forward.

Both average gradients over ranks; the trainer multiplies each rank's loss by the world size
so that the result is the sum over ranks divided by the global token count (see objectives/loss.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from sftune.config import DistConfig
from sftune.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_kind: str, group: bool = False) -> World:
    """Joins the torchrun process group when launched by torchrun; otherwise world size 1,
    with a one-process group when `group` (DDP and FSDP2 need one, even alone)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if group and not dist.is_initialized():
            if device_kind == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group(
                backend="nccl" if device_kind == "cuda" else "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
            )
        return World()
    world = World(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op on one process). Does not synchronise the host."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of the ranks' values (a micro-batch every rank can run)."""
    t = torch.tensor([-value], device=device)
    return -int(all_reduce_max(t).item())


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank (used for run directories and timestamps)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main_process() -> bool:
    """Rank 0, or the only process (for code that runs before a World is passed to it)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def first_error(message: str | None) -> str | None:
    """The first rank's error message, on every rank, where any rank has one (all ranks call
    it): the ranks stop together instead of waiting for one that gave up."""
    if not dist.is_initialized():
        return message
    box: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(box, message)
    return next((m for m in box if m), None)


def resolve_device(requested: str, world: World) -> torch.device:
    """--device: "auto" is this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- --dist


# `auto` replicates when weights + gradients + AdamW state take at most this share of one GPU:
# the rest holds activations, whose micro-batch the probe then makes as large as fits. The
# Llama 3.1 8B config in bf16 needs 43% of an H200 (60 GiB of 140) and is sharded; a 3B model
# (17%) or Llama-3.2-1B (7%) is replicated.
REPLICATE_MAX_SHARE = 0.4


class Plan(NamedTuple):
    strategy: str  # "none", "ddp" or "fsdp"
    reshard_after_forward: bool  # FSDP: every layer but the last frees its gathered parameters
    why: str  # one line for the run's notes


def training_state_bytes(model: torch.nn.Module) -> int:
    """Weights, plus gradients and AdamW's two moments for the trainable ones (LoRA: the
    adapters), each in its parameter's dtype, as torch's AdamW keeps them (train/optim.py)."""
    total = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        total += size * (4 if p.requires_grad else 1)
    return total


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fits_replicated(model: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """Whether a whole copy of the training state leaves room for activations on one GPU, and
    why. On the CPU there is no device memory to budget: replicated."""
    need = training_state_bytes(model)
    if device.type != "cuda":
        return True, f"training state {_size(need)} in host memory (CPU: not budgeted)"
    total = torch.cuda.get_device_properties(device).total_memory
    fits = need <= REPLICATE_MAX_SHARE * total
    why = (
        f"weights + gradients + AdamW state {_size(need)} = {100 * need / total:.0f}% of "
        f"the GPU's {total / 2**30:.0f} GiB ({'within' if fits else 'over'} "
        f"{100 * REPLICATE_MAX_SHARE:.0f}%)"
    )
    return bool(broadcast_object(fits)), why  # rank 0's answer: every rank must agree


def plan(cfg: DistConfig, world: World, model: torch.nn.Module, device: torch.device) -> Plan:
    """--dist and --reshard-after-forward resolved for this model, device and world size."""
    wanted = cfg.dist
    fits, why = fits_replicated(model, device)
    if wanted == "auto":
        if cfg.cpu_offload:
            wanted, why = "fsdp", "--cpu-offload is FSDP2's CPUOffloadPolicy"
        elif not world.distributed:
            wanted, why = "none", "--dist auto"
        elif cfg.reduce_fp32:
            wanted, why = "fsdp", "--reduce-fp32 is an FSDP setting"
        else:
            wanted = "ddp" if fits else "fsdp"
    else:
        why = f"--dist {wanted}" + ("" if wanted == "none" else f"; {why}")
    reshard = {"on": True, "off": False}.get(cfg.reshard_after_forward, not fits)
    if wanted != "fsdp":
        reshard = False
    return Plan(wanted, reshard, why)


def describe(p: Plan, world: World) -> str:
    """The run's note on how the ranks hold the model."""
    engine = {
        "none": "one process, nothing wrapped",
        "ddp": f"DDP (replicated) over {world.world_size} rank(s)",
        "fsdp": f"FSDP2 over {world.world_size} rank(s), "
        + ("resharding after forward" if p.reshard_after_forward else "no resharding"),
    }[p.strategy]
    return f"dist {p.strategy}: {engine} ({p.why})"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (`model.model.layers`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return list(layers)


def apply_ddp(root: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP in place (`replicate`): the module keeps its class, names and methods.

    The rotary tables are the only buffers and are the same on every rank: no broadcast of
    them before every forward. The gradients are views of DDP's all-reduce buckets instead of
    a second copy (gradient_as_bucket_view).
    """
    import inspect

    from torch.distributed._composable.replicate import replicate
    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed the switch (the old name warns; the new one still syncs once at init).
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    # Dynamo would split each compiled layer's graph at DDP's bucket boundaries
    # (DDPOptimizer), which only pays for a whole-model graph; the layers' graphs are small
    # and their gradients reach DDP's hooks when each layer's backward ends.
    torch._dynamo.config.optimize_ddp = False
    replicate(root, device_id=device, gradient_as_bucket_view=True, **no_buffer_sync)
    return root


def apply_fsdp(
    root: torch.nn.Module,
    hf_model: torch.nn.Module,
    cfg: DistConfig,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root module that owns the rest.

    reshard_after_forward: every layer but the last frees its gathered parameters after
    forward and gathers them again in backward; off, they stay gathered until backward is done
    with them (one all-gather per micro-batch instead of two, one more copy of the weights).
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs: dict = {}
    if param_dtype is not None or cfg.reduce_fp32:
        reduce_dtype = torch.float32 if cfg.reduce_fp32 else param_dtype
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype
        )
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(hf_model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again right away in backward.
        reshard = reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, reshard_after_forward=reshard, **kwargs)
    # The root's parameters (embeddings, head) are needed again at once by backward: FSDP's
    # own default for a root, said explicitly for every torch version.
    fully_shard(root, reshard_after_forward=False, **kwargs)
    register_fsdp_forward_method(root, "last_logits")  # gathers the root's params like forward
    return root


def set_grad_sync(module: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-batch of a step; a plain module has nothing to skip."""
    setter = getattr(module, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2-sharded tensor (parameter, gradient, optimizer state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, as a plain tensor on its storage (writes reach the
    DTensor); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def is_replicated(module: torch.nn.Module) -> bool:
    """DDP applied in place by `apply_ddp`."""
    from torch.distributed._composable.replicate import DDP

    return isinstance(module, DDP)
