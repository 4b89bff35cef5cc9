"""Offloaded activation checkpoints: every decoder layer is recomputed in backward, and the one
tensor its checkpoint keeps, the layer's input hidden states, waits in CPU memory instead of
on the GPU.

    sftune train --model DIR --train-data long.jsonl --seq-length 131072 --activation-offload on

    note = offload.configure(cfg, hf_model, compiled)  # module.build_module: --activation-offload
    note = offload.apply(hf_model, True)    # before torch.compile and FSDP2 see the layers
    note = offload.apply(hf_model, True, keep=4)  # the last 4 layers' inputs stay on the GPU
    offload.enabled(hf_model)               # True
    offload.apply(hf_model, False)          # back to what the layers did before

What holds the bytes. With plain (non-reentrant) checkpointing a layer keeps nothing of its
forward but its inputs: `torch.utils.checkpoint` stores them with `_CheckpointFrame.save_inputs`
as autograd SavedTensors, outside its own hooks (the saved tensors of the layer's ops inside
become placeholders that the recompute refills; so does the MLP input that --tiled-mlp keeps).
A SavedTensor created under `torch.autograd.graph.saved_tensors_hooks` is packed by those
hooks, so hooks pushed around the checkpoint call see one tensor per layer, the input hidden
states (B x S x hidden: for Llama 3 8B in bf16, 32 layers x 8 KiB = 256 KiB per token), and
nothing else but, in torch < 2.13, an empty placeholder (`_NoopSaveInputs`'s), which stays
put. tests/test_offload.py counts them, and checks that with plain checkpointing the layer
inputs are alive after forward and with offload they are not. That is what moves:

    forward, layer i:  pack(x_i)    compute stream --event--> side stream: x_i -> pinned host
                                    buffer (non_blocking); x_i.record_stream(side) keeps its GPU
                                    block from reuse until the copy is done, and x_i is freed as
                                    soon as the loop moves on to layer i+1
    backward, layer i: unpack(x_i)  wait for x_i's copy back (prefetched while layer i+1 ran
                                    its backward), then start bringing back x_{i-1} (one layer
                                    ahead) on the side stream, overlapped with layer i's
                                    recompute and backward

So the GPU holds at most two layer inputs at a time (the one in use and the one in flight),
against one per layer with plain checkpointing. The host holds them all, pinned (torch's
caching host allocator reuses the buffers from step to step): 8 GiB per 32K tokens for the 8B.
Measured on an H200 (tests/test_gpu_offload.py, 24 layers of width 2048, 8K tokens, eager):
the peak above weights and gradients fell from 1,397 to 661 MiB (23 of the 24 layer inputs of
32 MiB), and forward+backward took 3.2% longer (202 against 196 ms).

Where it plugs in: Hugging Face's decoder layers (`GradientCheckpointingLayer`) call
`self._gradient_checkpointing_func(partial(forward, self, **kwargs), hidden_states)` inside
`forward`, so module hooks (FSDP2's all-gather and reduce-scatter) stay outside and do not run
again in the recompute (older transformers, 5.17 for one, checkpoint the layer's whole
`Module.__call__` instead: then they do, as with their plain checkpointing). `apply` sets that
function, per layer, to an `Offloader`'s entry: the layer is checkpointed once, by it, and
Hugging Face's own checkpoint function is not used for it.

torch.compile: `module.build_module` compiles each decoder layer. Dynamo does not trace an
`Offloader`'s entry (`torch._dynamo.disable`d, non-recursively: it runs eagerly, its hooks and
streams stay out of the graph, one graph break per layer); the layer's `forward` inside it is
compiled by itself (`torch.compile` of the function, once per process: its guards see each
layer's parameters as inputs), so the forward and the recompute in backward both run compiled
code. With the older transformers the layer's own compiled call runs inside the checkpoint.

On a CPU device the same code path copies within host memory (no pinned memory, no streams):
the tests run it in float64 and compare losses and gradients exactly with plain checkpointing.

`--activation-offload-keep N` keeps the inputs of the last N decoder layers on the GPU (plain
checkpointing for them): backward reaches them first, so they need no copy back, and while they
run the input of the highest offloaded layer is already prefetched. What the host holds then is
(L - N) layers x micro-batch x seq x hidden x the hidden states' bytes (`host_bytes`):
`check_host_memory` compares it, before any step, with the host's available memory less a
reserve (HOST_RESERVE_SHARE + HOST_RESERVE_BYTES) and names the smallest N that fits.

`--activation-offload auto` is resolved by the memory planner; until it is, it means off.
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sftune.config import RunConfig
from sftune.errors import ConfigError, SftuneError
from sftune.train import distributed
from sftune.train.distributed import decoder_layers

# Smaller saved tensors stay where they are: torch < 2.13's checkpoint also saves an empty
# placeholder per layer next to its inputs, which would otherwise take the prefetch's turn.
MIN_OFFLOAD_BYTES = 1024

# Host memory not given to offloaded inputs: 10% of what is available (the kernel's own slack:
# MemAvailable counts page cache it may not give back at once) and 8 GiB for this process's own
# growth after the build (the data loader, a checkpoint save's host copy of the state, CUDA's
# pinned staging). On a small host (a CPU test box) the reserve is at most half of what is
# available, so a small model can still offload.
HOST_RESERVE_SHARE = 0.10
HOST_RESERVE_BYTES = 8 * 2**30
GIB = 2**30


class _Saved:
    """One packed layer input: its host copy, and its copy back on the device once fetched."""

    __slots__ = ("host", "device", "back", "ready", "unpacked", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev):
        self.host = host
        self.device = device
        self.back: torch.Tensor | None = None  # the device copy, once fetched
        self.ready = None  # a CUDA event: the copy back is done
        self.unpacked = 0
        self.prev = prev  # a weakref to the input packed just before (the layer below)


class Offloader:
    """A decoder layer's checkpoint function, shared by all the layers of one model: runs
    `torch.utils.checkpoint` (non-reentrant) with the inputs it saves moved off the device.

    Counts what it moved (`packed`, `packed_bytes`, `unpacked`, `prefetched`,
    `prefetched_bytes`) and what it kept on the device (`kept`: the inputs of the layers
    `keep_entry` checkpoints): the tests read them to see that the offload really ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.compile_layers = False
        self.compile_mode: str | None = None
        self._last = None  # weakref to the latest _Saved
        self.packed = 0
        self.packed_bytes = 0
        self.unpacked = 0
        self.prefetched = 0
        self.prefetched_bytes = 0
        self.kept = 0
        # What the layers call, as `entry(fn, *args)`: offloaded, or kept on the device.
        self.entry = functools.partial(_hidden_from_dynamo(), self, True)
        self.keep_entry = functools.partial(_hidden_from_dynamo(), self, False)

    # ------------------------------------------------------------------ forward: to the host

    def _pack(self, t: torch.Tensor) -> _Saved | torch.Tensor:
        if t.numel() * t.element_size() < MIN_OFFLOAD_BYTES:
            return t
        if self.cuda and t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            # The copy starts once the compute stream has produced t, and runs beside it.
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # t's block is not reused before the copy is done
        else:
            host = torch.empty(t.shape, dtype=t.dtype)
            host.copy_(t)
        saved = _Saved(host, t.device, self._last)
        self._last = weakref.ref(saved)
        self.packed += 1
        self.packed_bytes += t.numel() * t.element_size()
        return saved

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES:
            self.kept += 1
        return t

    # ------------------------------------------------------------------ backward: back again

    def _unkeep(self, t: torch.Tensor) -> torch.Tensor:
        # A kept layer's backward: the highest offloaded input is the next that will be needed.
        if t.numel() * t.element_size() >= MIN_OFFLOAD_BYTES:
            self._prefetch(self._last() if self._last is not None else None)
        return t

    def _prefetch(self, saved: _Saved | None) -> None:
        if saved is not None and saved.unpacked == 0 and saved.back is None:
            self._fetch(saved)
            self.prefetched += 1
            self.prefetched_bytes += saved.host.numel() * saved.host.element_size()

    def _fetch(self, saved: _Saved) -> None:
        if saved.device.type != "cuda":
            saved.back = saved.host.to(saved.device)
            return
        # Same side stream as the copy out: it is ordered after it.
        with torch.cuda.stream(self.stream):
            saved.back = saved.host.to(saved.device, non_blocking=True)
            saved.ready = self.stream.record_event()

    def _unpack(self, saved: _Saved | torch.Tensor) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):  # small: never moved
            return saved
        if saved.back is None:
            self._fetch(saved)
        back, saved.back = saved.back, None
        if saved.ready is not None:
            current = torch.cuda.current_stream(saved.device)
            current.wait_event(saved.ready)
            back.record_stream(current)  # made on the side stream, used and freed on this one
            saved.ready = None
        saved.unpacked += 1
        self.unpacked += 1
        # Prefetch one layer ahead: the layer below is the next one backward recomputes.
        self._prefetch(saved.prev() if saved.prev is not None else None)
        return back


def _checkpoint(offloader: Offloader, to_host: bool, fn, *args, **kwargs):
    """`torch.utils.checkpoint` of `fn(*args, **kwargs)` with the offloader's hooks (to_host:
    the inputs offloaded; else kept, only counted)."""
    # transformers >= 5 checkpoints the layer's plain `forward` function from inside the
    # layer's (compiled) call: compile it here. Older versions checkpoint the bound
    # `Module.__call__`, which runs the layer's own compiled call already.
    if (
        offloader.compile_layers
        and isinstance(fn, functools.partial)
        and inspect.isfunction(fn.func)
    ):
        fn = functools.partial(_compiled(fn.func, offloader.compile_mode), *fn.args, **fn.keywords)
    hooks = (
        (offloader._pack, offloader._unpack) if to_host else (offloader._keep, offloader._unkeep)
    )
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@functools.cache
def _hidden_from_dynamo():
    """`_checkpoint`, which Dynamo does not trace (but does the functions it calls): its hooks
    and streams stay out of the graph. Made on first use, not with a decorator: importing
    Dynamo costs seconds, paid only when offload is on. A plain function: older torch sets an
    attribute on the function it is given, which a bound method refuses."""
    return torch._dynamo.disable(_checkpoint, recursive=False)


@functools.cache
def _compiled(forward, mode: str | None):
    """A decoder layer class's `forward`, compiled once for all its layers (their parameters
    are graph inputs), so the forward and the recompute in backward both run compiled code."""
    return torch.compile(forward, mode=mode)


def offloader(hf_model: nn.Module) -> Offloader | None:
    """The model's Offloader, where `apply` put one on its decoder layers."""
    layers = decoder_layers(hf_model)
    found = {id(o): o for layer in layers if (o := _offloader_of(layer)) is not None}
    on = len(found) == 1 and all(
        getattr(layer, "gradient_checkpointing", False) for layer in layers
    )
    return next(iter(found.values())) if on else None


def enabled(hf_model: nn.Module) -> bool:
    """Every decoder layer is checkpointed by the offloader (its inputs offloaded, or kept)."""
    return offloader(hf_model) is not None


def kept(hf_model: nn.Module) -> int:
    """How many (last) decoder layers keep their inputs on the device; 0 when offload is off."""
    shared = offloader(hf_model)
    if shared is None:
        return 0
    return sum(_func(layer) is shared.keep_entry for layer in decoder_layers(hf_model))


def _func(layer: nn.Module):
    return layer.__dict__.get("_gradient_checkpointing_func")


def _offloader_of(layer: nn.Module) -> Offloader | None:
    shared = layer.__dict__.get("_sftune_offloader")
    ours = shared is not None and _func(layer) in (shared.entry, shared.keep_entry)
    return shared if ours else None


def configure(cfg: RunConfig, hf_model: nn.Module, compiled: bool) -> str | None:
    """--activation-offload on: offload the model's layers (compiled: they are torch.compile'd,
    in --compile-mode); a note for the build log, None when off. "auto" is the memory
    planner's to resolve; until it does, it means off."""
    keep = cfg.model.activation_offload_keep
    if cfg.model.activation_offload == "off":
        return (
            f"--activation-offload-keep {keep} ignored: activation offload is off" if keep else None
        )
    if cfg.model.activation_offload == "auto":
        return "activation offload auto: off (not chosen by the memory planner)"
    mode = None if cfg.model.compile_mode == "default" else cfg.model.compile_mode
    return apply(hf_model, True, keep=keep, compile_layers=compiled, compile_mode=mode)


def apply(
    hf_model: nn.Module,
    on: bool,
    *,
    keep: int = 0,
    compile_layers: bool = False,
    compile_mode: str | None = None,
) -> str:
    """Checkpoint every decoder layer with its inputs offloaded (on), but for the last `keep`
    layers, whose inputs stay on the device; or give the layers back what they had before
    (off: plain checkpointing or none). Returns a note for the build log.

    compile_layers: the layers are torch.compile'd (module.build_module; torch.compile's
    `mode`: compile_mode): the offloaded checkpoint then compiles each layer's forward inside
    it, which the layer's own compiled call reaches through one graph break."""
    layers = decoder_layers(hf_model)
    if not on:
        for layer in layers:
            before = layer.__dict__.pop("_sftune_before_offload", None)
            layer.__dict__.pop("_sftune_offloader", None)
            if before is not None:
                layer.gradient_checkpointing, func = before
                if func is None:
                    layer.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    layer._gradient_checkpointing_func = func
        return "activation offload off"
    if not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
        raise SftuneError(
            f"--activation-offload on: the decoder layers of {type(hf_model).__name__} do not "
            "support checkpointing (no Hugging Face GradientCheckpointingLayer); use "
            "--activation-offload off"
        )
    if keep > len(layers):
        raise ConfigError(
            f"--activation-offload-keep {keep}: the model has only {len(layers)} decoder layers; "
            f"use {len(layers)} or less"
        )
    device = next(hf_model.parameters()).device
    current = offloader(hf_model)
    shared = current or Offloader(device)
    shared.compile_layers, shared.compile_mode = compile_layers, compile_mode
    offloaded = len(layers) - keep
    for i, layer in enumerate(layers):
        if _offloader_of(layer) is None:
            layer._sftune_before_offload = (layer.gradient_checkpointing, _func(layer))
        layer.gradient_checkpointing = True
        layer._sftune_offloader = shared
        layer._gradient_checkpointing_func = shared.entry if i < offloaded else shared.keep_entry
    hf_model.config.use_cache = False
    where = (
        "pinned CPU memory (side stream, prefetched one layer ahead)"
        if shared.cuda
        else "host memory (CPU device: a copy, no pinned memory or streams)"
    )
    which = "their inputs" if not keep else f"the inputs of the first {offloaded}"
    kept_note = f", the last {keep} kept on the device" if keep else ""
    per_token = host_bytes(hf_model, offloaded, 1, 1)
    return (
        f"activation offload: {len(layers)} decoder layers checkpointed, {which} in {where}"
        f"{kept_note} ({per_token / 1024:,.1f} KiB of host memory per token)"
    )


# ----------------------------------------------------------------------------- host memory


def _size(n: float) -> str:
    """Bytes in the largest of GiB, MiB, KiB that they fill."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def layer_input_bytes(hf_model: nn.Module, micro_batch: int, seq_length: int) -> int:
    """One decoder layer's input hidden states: micro-batch x seq x hidden x the residual
    stream's bytes (the embeddings' dtype: fp32 weights under bf16 autocast keep it fp32)."""
    c = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else None
    hidden = (c or hf_model.config).hidden_size
    itemsize = hf_model.get_input_embeddings().weight.element_size()
    return micro_batch * seq_length * hidden * itemsize


def host_bytes(hf_model: nn.Module, offloaded: int, micro_batch: int, seq_length: int) -> int:
    """The host memory `offloaded` layers' inputs take (one micro-batch: backward frees them)."""
    return offloaded * layer_input_bytes(hf_model, micro_batch, seq_length)


def host_available() -> int:
    """The host's available memory in bytes: /proc/meminfo's MemAvailable (free pages plus
    what the kernel can reclaim), else free pages alone."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_room(available: int) -> int:
    """What offloaded inputs may take of `available` bytes (see HOST_RESERVE_BYTES).

    >>> host_room(128 * GIB) / GIB  # 128 - 12.8 - 8
    107.2
    >>> host_room(8 * GIB) / GIB  # a small host: half
    4.0
    """
    reserve = min(HOST_RESERVE_SHARE * available + HOST_RESERVE_BYTES, available / 2)
    return int(available - reserve)


def smallest_keep(layers: int, per_layer: int, room: int) -> int:
    """The fewest last layers to keep on the device so that the others' inputs (`per_layer`
    bytes each, for all the ranks of this host) fit `room` bytes; `layers`: none fits.

    >>> smallest_keep(32, 8 * GIB, 107 * GIB)  # 13 layers of 8 GiB fit
    19
    >>> smallest_keep(32, 1, 10**9), smallest_keep(32, 200 * GIB, GIB)
    (0, 32)
    """
    return max(0, layers - room // per_layer) if per_layer > 0 else 0


def check_host_memory(
    layers: int, keep: int, per_layer: int, available: int, ranks: int = 1, what: str = ""
) -> str:
    """A note on the host memory the offloaded inputs take, or a one-line SftuneError where
    they would not fit (with the smallest --activation-offload-keep that does). `per_layer`:
    one layer input's bytes on one rank; `ranks`: the ranks on this host, each pinning its own;
    `what`: how the per-layer bytes were counted, for the messages."""
    need = (layers - keep) * per_layer * ranks
    room = host_room(available)
    on_host = f" x {ranks} ranks on this host" if ranks > 1 else ""
    head = (
        f"--activation-offload: the inputs of {layers - keep} offloaded layer(s){on_host} need "
        f"{_size(need)} of host memory{f' ({what})' if what else ''}"
    )
    if need <= room:
        return f"{head}; {_size(available)} available"
    k = smallest_keep(layers, per_layer * ranks, room)
    fix = (
        f"use --activation-offload-keep {k} (the last {k} layers' inputs stay on the GPU)"
        if k < layers
        else "not one layer's inputs fits: use --activation-offload off"
    )
    raise SftuneError(
        f"{head}, but only {_size(available)} is available ({_size(room)} after "
        f"the reserve for the process itself: 10% + 8 GiB, at most half): {fix}, a shorter --seq-length or "
        "a smaller --micro-batch-size"
    )


def check_host(hf_model: nn.Module, micro_batch: int, seq_length: int) -> str | None:
    """`check_host_memory` for the model as `apply` left it (train/build.py, once the
    micro-batch is known, before any step); None when offload is off. Every rank reads rank
    0's available memory, so all of them fail alike or none."""
    if not enabled(hf_model):
        return None
    layers, keep = len(decoder_layers(hf_model)), kept(hf_model)
    per_layer = layer_input_bytes(hf_model, micro_batch, seq_length)
    itemsize = hf_model.get_input_embeddings().weight.element_size()
    hidden = per_layer // (micro_batch * seq_length * itemsize)
    what = (
        f"{layers - keep} x micro-batch {micro_batch} x {seq_length:,} tokens x {hidden:,} x "
        f"{itemsize} bytes"
    )
    available = distributed.broadcast_object(host_available())
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return check_host_memory(layers, keep, per_layer, available, ranks, what)
