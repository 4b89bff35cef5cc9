"""All distributed code in one place: process group, rank helpers, FSDP2 wrapping, reductions.

One process (`python -m sftune train ...`) is world size 1 of the same code path:

    torchrun --standalone --nproc-per-node 8 -m sftune train --model DIR --train-data data.jsonl
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m sftune train --model DIR --train-data data.jsonl

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer and then the root
(embeddings, final norm, output projection), as torchtitan does. Gradients are averaged over
ranks by FSDP; the trainer multiplies each rank's loss by the world size so that the result is
the sum over ranks divided by the global token count (see train/loss.py).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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


def init(device_kind: str) -> World:
    """Joins the torchrun process group when launched by torchrun; otherwise world size 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
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


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank (used for run directories and timestamps)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(requested: str, world: World) -> torch.device:
    """--device: "auto" is this rank's GPU when CUDA is available, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def use_fsdp(cfg: DistConfig, world: World) -> bool:
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and world.distributed)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (`model.model.layers`)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        layers = getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return list(layers)


def apply_fsdp(
    root: torch.nn.Module,
    hf_model: torch.nn.Module,
    cfg: DistConfig,
    param_dtype: torch.dtype | None,
) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root module that owns the rest."""
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
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(root, **kwargs)
    register_fsdp_forward_method(root, "last_logits")  # gathers the root's params like forward
    return root


def is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def set_grad_sync(module: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient reduce-scatter on all but the last micro-batch of a step."""
    if is_fsdp(module):
        module.set_requires_gradient_sync(enabled)
