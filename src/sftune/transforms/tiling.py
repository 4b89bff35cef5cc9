"""Tiled MLP: each decoder layer's MLP computed over the tokens in tiles, forward and backward,
so that its wide intermediate (the 8B's 14,336 columns: 3.5 GiB per bf16 tensor at 128K
tokens) is never held whole. A model transform applied at build, like LoRA and FP8.

    note = tiling.apply(hf_model, chunk_tokens=4096)   # "tiled MLP: 4,096 tokens per tile ..."
    tiling.enabled(hf_model), tiling.tile_tokens(hf_model)   # True, 4096
    tiling.apply(hf_model, 0)                           # undone: the plain MLP again
    tiling.default_chunk(hidden=4096, intermediate=14336, seq=131072)   # 4096

    sftune train --model DIR --seq-length 131072 --tiled-mlp on [--tiled-mlp-chunk 4096]

The shape is ALST's (arXiv 2506.13996; deepspeed's `TiledMLP`), written for sftune:

    forward:   y[tile] = mlp(x[tile])   for each tile, under no_grad: only x is saved
    backward:  for each tile, recompute mlp(x[tile]) with grad and take
               d x[tile], d params += autograd.grad(mlp(x[tile]), (x[tile], params), dy[tile])

The MLP is applied token by token, so the tiles are rows of the flattened (batch x seq)
tokens; packed documents and position ids do not reach it. Unlike deepspeed's version, which
calls `torch.autograd.backward` inside backward (a parameter's gradient is then accumulated once
per tile, and DDP's reducer sees it "ready" once per tile), the trainable
parameters are inputs of the autograd Function and their gradient, summed over the tiles, is
returned once, through the ordinary accumulation: DDP's hooks, FSDP2's post-backward
reduce-scatter and LoRA's frozen base (no gradient asked for it) then see what they see without
tiling. The parameters are read from the module at each call, so FSDP2's unsharded parameters
(registered on the module while the layer runs) are the ones differentiated.

What it costs: without activation checkpointing, one more MLP forward per step (backward
recomputes the tiles). With it, none: the layer's recompute stops before the tiles (see
_KeepInput) and backward recomputes them instead, so the MLP runs forward twice per step as it
does untiled. The gradients of the MLP's trainable weights are summed over the tiles in their
own dtype (as micro-batches are summed into .grad), which holds one tile's gradients next to
the sum while a layer's backward runs (a full fine-tune of the 8B in bf16: 0.34 GiB more, one
layer at a time; nothing worth counting for LoRA).

What it saves, per token at the 8B's widths in bf16 with checkpointed layers (measured on the
CPU with the profiler's memory timeline, the slope between 64 and 128 tokens, LoRA r 16): the
forward keeps each layer's input (8 KiB) and, outside the layers, 25 KiB (the final norm's fp32
input, the fused loss's gradient, rotary cos/sin); the one layer being recomputed and
differentiated needs 253 KiB more untiled, 124 KiB tiled.

torch.compile: dynamo cannot trace a Function whose backward calls `torch.autograd.grad`, so
the tiled MLP runs eagerly (`torch.compiler.disable`) inside a compiled layer: the layer's
graph breaks around its MLP, and the attention and norms stay compiled.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from sftune.config import RunConfig
from sftune.errors import SftuneError
from sftune.train.distributed import decoder_layers

# Set on each tiled MLP module: its tile size in tokens.
_ATTR = "_sftune_tile_tokens"

# A tile of at least this many tokens keeps the MLP's GEMMs large enough to run near peak; its
# intermediate stays within this many elements (512 MiB in bf16) however wide the MLP is.
_MIN_TILE, _MAX_TILE_ELEMENTS = 2048, 2**28


def default_chunk(hidden: int, intermediate: int, seq: int) -> int:
    """Tokens per tile: about `hidden` tokens (ALST's default: the tile's intermediate, chunk x
    intermediate, is then the size of one MLP weight, hidden x intermediate), at least 2,048
    and at most 2**28 / intermediate; then evened out along the sequence, so that tiles end
    where sequences end: a long sequence is cut into equal tiles, short ones are tiled whole,
    as many to a tile as fit.

    For the 8B (4,096 x 14,336) at 128K tokens: 32 tiles of 4,096 tokens, whose intermediate is
    112 MiB in bf16 against 3.5 GiB untiled.
    """
    base = max(1, min(max(_MIN_TILE, hidden), _MAX_TILE_ELEMENTS // intermediate))
    if seq <= base:
        return seq * (base // seq)
    tiles = -(-seq // base)
    return -(-seq // tiles)


def configure(cfg: RunConfig, hf_model: nn.Module) -> str | None:
    """--tiled-mlp on: tile the model's MLPs (--tiled-mlp-chunk tokens, or the default for its
    sizes at --seq-length); a note for the build log, None when off. "auto" is the memory
    planner's to resolve; until it does, it means off."""
    if cfg.model.tiled_mlp == "off":
        return None
    if cfg.model.tiled_mlp == "auto":
        return "tiled MLP auto: off (not chosen by the memory planner)"
    text = hf_model.config.get_text_config()
    chunk = cfg.model.tiled_mlp_chunk or default_chunk(
        text.hidden_size, text.intermediate_size, cfg.data.seq_length
    )
    return apply(hf_model, chunk)


def apply(hf_model: nn.Module, chunk_tokens: int) -> str:
    """Tile every decoder layer's MLP at `chunk_tokens` tokens (0: untile); a note for the
    build log. The module tree and its state dict keys are unchanged: only each MLP's forward
    is replaced (on the instance), so checkpoints, LoRA's adapter names and FSDP2's sharding
    see the same model."""
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    mlps = [_mlp_of(layer) for layer in decoder_layers(hf_model)]
    for mlp in mlps:
        if hasattr(mlp, _ATTR):  # undo first: applying twice must not wrap twice
            delattr(mlp, _ATTR)
            del mlp.forward
        if chunk_tokens:
            setattr(mlp, _ATTR, chunk_tokens)
            mlp.forward = functools.partial(_tiled_forward, mlp, type(mlp).forward)
    if not chunk_tokens:
        return "tiled MLP off"
    return f"tiled MLP: {chunk_tokens:,} tokens per tile in each of the {len(mlps)} layers' MLPs"


def enabled(hf_model: nn.Module) -> bool:
    """Whether `apply` tiled this model's MLPs."""
    return tile_tokens(hf_model) > 0


def tile_tokens(hf_model: nn.Module) -> int:
    """The tokens per tile `apply` set (0: untiled), for the resolved config."""
    return max(getattr(_mlp_of(layer), _ATTR, 0) for layer in decoder_layers(hf_model))


def _mlp_of(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise SftuneError(
            f"--tiled-mlp: {type(layer).__name__} has no .mlp module to tile: use --tiled-mlp off"
        )
    return mlp


# ----------------------------------------------------------------------------- the computation


@torch.compiler.disable  # see the module doc: the Function's backward cannot be traced
def _tiled_forward(mlp: nn.Module, plain_forward, x: torch.Tensor) -> torch.Tensor:
    chunk = getattr(mlp, _ATTR)
    tokens = x.shape[:-1].numel()
    run = functools.partial(plain_forward, mlp)
    if tokens <= chunk:  # one tile: the plain MLP, the same graph as untiled
        return run(x)
    params = _trainable(mlp)
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        with torch.no_grad():  # evaluation, generation: tiled too, nothing saved
            return _TiledMLP.run_tiles(run, x, chunk)
    keeper = None
    if x.requires_grad:
        x = _KeepInput.apply(x)
        keeper = x.grad_fn
    return _TiledMLP.apply(run, chunk, _has_dropout(mlp), keeper, x, *params)


def _trainable(mlp: nn.Module) -> list[torch.Tensor]:
    return [p for p in mlp.parameters() if p.requires_grad]


def _has_dropout(mlp: nn.Module) -> bool:
    """Whether the forward draws random numbers (LoRA's dropout), so backward's recompute
    must replay the forward's random state."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in mlp.modules())


class _KeepInput(torch.autograd.Function):
    """x unchanged, saved for _TiledMLP's backward, which reads it from here. Saved before the
    tiles run, it lets a checkpointed layer's recompute stop right there (torch.utils.checkpoint
    stops once every tensor saved in forward is saved again, and a Llama layer saves nothing
    after its MLP's input): the tiled forward runs twice per step, not three times."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _TiledMLP(torch.autograd.Function):
    """y = run(x) computed tile by tile; gradients for x and the trainable `params` that `run`
    reads (passed in so that autograd accumulates their gradient once, after all tiles). x is
    saved by `keeper` (a _KeepInput node) where x needs a gradient, else here."""

    @staticmethod
    def forward(ctx, run, chunk: int, replay_rng: bool, keeper, x: torch.Tensor, *params):
        ctx.run, ctx.chunk, ctx.params, ctx.keeper = run, chunk, params, keeper
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device) if replay_rng else None
        if keeper is None:
            ctx.save_for_backward(x)
        with torch.no_grad():
            return _TiledMLP.run_tiles(run, x, chunk)

    @staticmethod
    def run_tiles(run, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """run(x) one tile of `chunk` tokens at a time, written into one output tensor."""
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in range(0, rows.shape[0], chunk):
            y = run(rows[start : start + chunk])
            if not isinstance(y, torch.Tensor):  # a mixture of experts' (hidden, router logits)
                raise SftuneError(
                    f"--tiled-mlp: this model's MLP returns {type(y).__name__}, not a tensor; "
                    "tiling supports token-wise MLPs only: use --tiled-mlp off"
                )
            if out is None:  # the output's width and dtype (bf16 under autocast) from tile 1
                out = y.new_empty(rows.shape[0], y.shape[-1])
            out[start : start + chunk] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = (ctx.keeper or ctx).saved_tensors
        params = ctx.params
        # The recompute reads the module's parameters again: they must be the tensors whose
        # gradients autograd expects (FSDP2 gathers into the same ones), or the gradients
        # would silently be None.
        now = _trainable(ctx.run.args[0])
        if len(now) != len(params) or any(a is not b for a, b in zip(now, params, strict=False)):
            raise SftuneError(
                "--tiled-mlp: the MLP's trainable parameters changed between forward and "
                "backward (a wrapper that swaps them): use --tiled-mlp off"
            )
        need_x = ctx.needs_input_grad[4]
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        # Each parameter's gradient summed over the tiles in its own dtype, in place into the
        # first tile's: as gradient accumulation sums micro-batches into .grad. (float32 sums
        # would cost a full fine-tune of the 8B 1 GiB more per layer's backward.)
        sums: list[torch.Tensor | None] = [None] * len(params)
        shared = {_storage(grad_out), _storage(x)}  # what a gradient could be passed through as
        with _replayed_rng(x.device, ctx.rng), torch.enable_grad(), _autocast(ctx.autocast):
            for start in range(0, rows.shape[0], ctx.chunk):
                tile = rows[start : start + ctx.chunk].requires_grad_(need_x)
                y = ctx.run(tile)
                inputs = ([tile] if need_x else []) + list(params)
                grads = torch.autograd.grad(
                    y, inputs, grad_rows[start : start + ctx.chunk], allow_unused=True
                )
                if need_x:
                    grad_x[start : start + ctx.chunk] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    if sums[i] is None:  # summed into in place: never into dy or x themselves
                        sums[i] = g.clone() if _storage(g) in shared else g
                    else:
                        sums[i].add_(g)
        grad_x = grad_x.view_as(x) if need_x else None
        return (None, None, None, None, grad_x, *sums)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _autocast_state(device_type: str):
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()


def _autocast(state):
    """The forward's autocast again in backward (the engine runs backward without it)."""
    if state is None:
        return contextlib.nullcontext()
    device_type, dtype, cache = state
    return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=cache)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state):
    """The random state of the forward's first tile while backward recomputes the tiles (in
    the same order, so each draws the same dropout mask), the caller's state after."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
