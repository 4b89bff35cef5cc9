"""The trained module: a Hugging Face causal LM whose forward returns the token-weighted loss,
and how it is made ready to train (FP8 linears, loss wrapper, activation checkpointing,
per-layer compile, DDP or FSDP2) and how large a micro-batch fits it.

Putting the loss inside `forward` keeps the output projection inside the module that FSDP2
shards as the root, so its parameters are gathered when the fused loss reads them, and lets
`torch.compile`, FSDP and autocast treat "model + loss" as one unit.

    built = build_module(cfg, hf_model, device, world)     # .module, .dist, .notes
    loss = built.module(input_ids=ids, labels=labels, scale=1 / n_tokens)
    plan = plan_memory(built.module, optimizer, per_rank_batch=32, seq_length=512,
                       vocab_size=128256, device=device, budget_bytes=gpu_budget(device, 24),
                       checkpointing=False, offload="auto", tiled_mlp="auto")
    plan.micro_batch, plan.checkpointing, plan.offload, plan.tiled_chunk, plan.note

The plan's decision (which levers, which micro-batch, the longest length where nothing fits)
is transforms/memplan.py's, a pure function over the measurements taken here.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import NamedTuple

import torch
from torch import nn

from sftune.config import RunConfig
from sftune.errors import ConfigError, SftuneError
from sftune.objectives.loss import (
    cross_entropy_sum,
    fused_linear_cross_entropy,
    fused_linear_token_logprobs,
    upcast,
)
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.transforms import fp8, memplan, offload, tiling


def supports_fused_loss(model: nn.Module) -> bool:
    """Fused loss needs logits == hidden @ W.T exactly: no soft-capping or logit scaling."""
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text_cfg, "final_logit_softcapping", None) or getattr(text_cfg, "logit_scale", None):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and head.bias is None


class CausalLMWithLoss(nn.Module):
    """A causal LM whose forward returns `scale * (sum of per-token CE over trained labels)`.

        loss = module(input_ids=ids, labels=labels, position_ids=None, scale=1 / n_tokens)
        logits = module.last_logits(input_ids=ids)    # (B, V) fp32, for decoding step by step

    `last_logits` is registered with FSDP2 as a forward method (distributed.apply_fsdp), so
    the root's parameters are gathered for it just as for forward.
    """

    def __init__(
        self,
        lm: nn.Module,
        *,
        fused: bool,
        autocast_dtype: torch.dtype | None = None,
        chunk_size: int = 4096,
        compiled_loss: bool = False,
    ):
        super().__init__()
        self.lm = lm
        self.fused = fused
        self.compiled_loss = compiled_loss
        self.autocast_dtype = autocast_dtype
        self.chunk_size = chunk_size

    def autocast(self, device_type: str):
        """bf16 autocast for `--dtype bf16-mixed`; nothing otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def forward(
        self,
        input_ids,
        labels=None,
        position_ids=None,
        scale=1.0,
        attention_mask=None,
        source=None,
        target=None,
    ):
        """With `labels`: the scaled token-weighted CE. With `source` and `target` (the pair
        objectives, objectives/preference.py): log p(target[k]) at output `source[k]` of the flattened
        batch (N,), at least fp32; the other outputs never reach the head."""
        with self.autocast(input_ids.device.type):
            if source is not None:
                return self._token_logprobs(input_ids, position_ids, attention_mask, source, target)
            if self.fused:
                return self._fused_loss(input_ids, labels, position_ids, scale)
            logits = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            return (
                cross_entropy_sum(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) * scale
            )

    def last_logits(self, input_ids, position_ids=None):
        """The logits of the last position, (B, vocab) in fp32."""
        with self.autocast(input_ids.device.type):
            out = self.lm(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.logits[:, -1, :].float()

    def _token_logprobs(self, input_ids, position_ids, attention_mask, source, target):
        if not self.fused:  # a head that is not a plain linear (soft-capping): whole logits
            out = self.lm(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=False,
            )
            logits = upcast(out.logits.flatten(0, 1)[source])
            return logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )[0]
        weight = self.lm.get_output_embeddings().weight
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        return fused_linear_token_logprobs(
            hidden.flatten(0, 1)[source], weight, target, self.chunk_size, self.compiled_loss
        )

    def _fused_loss(self, input_ids, labels, position_ids, scale):
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        weight = self.lm.get_output_embeddings().weight
        if self.autocast_dtype is not None:
            hidden, weight = hidden.to(self.autocast_dtype), weight.to(self.autocast_dtype)
        return fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            scale,
            self.chunk_size,
            compiled=self.compiled_loss,
        )


# ----------------------------------------------------------------------------- building it


def enabled(setting: str, on_cuda: bool) -> bool:
    """An auto/on/off setting that "auto" turns on for CUDA."""
    return setting == "on" or (setting == "auto" and on_cuda)


SDPA_BACKENDS = {
    "flash": "enable_flash_sdp",
    "cudnn": "enable_cudnn_sdp",
    "efficient": "enable_mem_efficient_sdp",
}


def set_sdpa_backend(name: str) -> None:
    """Restrict SDPA to one fused kernel (math stays as the fallback); "auto" enables all.

    These are process-wide switches, read when a layer is compiled or run eagerly.
    """
    for backend, switch in SDPA_BACKENDS.items():
        getattr(torch.backends.cuda, switch)(name in ("auto", backend))


class ModuleBuild(NamedTuple):
    module: CausalLMWithLoss
    dist: str  # "none", "ddp" (replicated) or "fsdp" (sharded): --dist resolved
    reshard_after_forward: bool  # FSDP's layers free their gathered parameters after forward
    compiled: bool  # the decoder layers are torch.compile'd
    notes: list[str]
    # FP8 weights all-gathered under FSDP2: their scales are precomputed after each optimizer
    # step (fp8.precompute_scales_after_steps, once the optimizer exists)
    fp8_all_gather: bool = False

    @property
    def sharded(self) -> bool:
        return self.dist == "fsdp"


def build_module(cfg: RunConfig, hf_model, device: torch.device, world: World) -> ModuleBuild:
    """FP8 linears, loss wrapper, activation checkpointing, per-layer torch.compile, DDP or
    FSDP2: in that order."""
    notes: list[str] = []
    plan = distributed.plan(cfg.dist, world, hf_model, device)
    all_gather = plan.strategy == "fsdp" and cfg.model.fp8 == "tensorwise"
    if fp8.enabled(cfg.model.fp8):  # before compile and fully_shard see the layers
        fp8.check_available(cfg.model.fp8, device)
        notes.append(
            fp8.convert(
                hf_model, cfg.model.fp8, all_gather=all_gather, linears=cfg.model.fp8_linears
            )
        )
    fused = enabled(cfg.model.fused_loss, device.type == "cuda")
    if fused and not supports_fused_loss(hf_model):
        notes.append("fused loss off: the model's logits are not a plain linear projection")
        fused = False
    # bitsandbytes >= 0.50's 4-bit layers trace too: QLoRA compiles like the rest (1.39x faster
    # and 33% less memory at micro-batch 4 on the 8B config, docs/BENCHMARKS.md).
    compiled = enabled(cfg.model.compile, device.type == "cuda")
    autocast = torch.bfloat16 if cfg.model.dtype == "bf16-mixed" else None
    module = CausalLMWithLoss(
        hf_model, fused=fused, autocast_dtype=autocast, compiled_loss=fused and compiled
    )
    set_sdpa_backend(cfg.model.sdpa_backend)
    if cfg.model.sdpa_backend != "auto":
        notes.append(f"SDPA kernel: {cfg.model.sdpa_backend}")
    if cfg.model.activation_checkpointing:
        set_checkpointing(hf_model, True)
    if (note := tiling.configure(cfg, hf_model)) is not None:  # issue 26: before compile sees it
        notes.append(note)
    if (note := offload.configure(cfg, hf_model, compiled)) is not None:  # issue 26: offload
        notes.append(note)
    if compiled:
        # Read by the partitioner when each layer's graph is compiled (first step).
        torch._functorch.config.activation_memory_budget = cfg.model.activation_memory_budget
        mode = None if cfg.model.compile_mode == "default" else cfg.model.compile_mode
        for layer in distributed.decoder_layers(hf_model):
            layer.compile(mode=mode)
        budget = cfg.model.activation_memory_budget
        notes.append(
            f"torch.compile: each decoder layer ({cfg.model.compile_mode}"
            f"{f', activation memory budget {budget:g}' if budget < 1 else ''})"
        )
    if plan.strategy == "fsdp":
        param_dtype = torch.bfloat16 if cfg.model.dtype == "bf16-mixed" else None
        distributed.apply_fsdp(
            module,
            hf_model,
            cfg.dist,
            param_dtype,
            reshard_after_forward=plan.reshard_after_forward,
        )
    elif plan.strategy == "ddp":
        distributed.apply_ddp(module, device)
    notes.append(distributed.describe(plan, world))
    notes.append(f"loss: {'fused chunked linear+CE' if fused else 'full logits + CE'}")
    if fp8.enabled(cfg.model.fp8) and not compiled:
        notes.append("FP8 without compile: its casts run as separate kernels, eating the gain")
    return ModuleBuild(
        module, plan.strategy, plan.reshard_after_forward, compiled, notes, all_gather
    )


# ----------------------------------------------------------------------------- micro-batch probe


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's moments now (so the probe sees them) without changing any weight.

    A step with lr 0 and zero gradients leaves parameters and moments at exactly their
    start values; the step counters are reset so the first real step is step 1. A no-op once
    the state exists.
    """
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]  # floats, or tensors (compiled, 8-bit)
    for g in optimizer.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
        for p in g["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    for st in optimizer.state.values():
        if "step" in st:
            st["step"].zero_() if torch.is_tensor(st["step"]) else st.update(step=0)
    optimizer.zero_grad(set_to_none=True)


def gpu_budget(device: torch.device, max_memory_gib: float) -> int:
    """The bytes this run may use on its GPU. With `--max-memory-gib` the caching allocator is
    capped there (an allocation past it raises out-of-memory, as on a smaller card)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = min(int(max_memory_gib * 2**30) if max_memory_gib > 0 else total, total)
    # Set every time, uncapped too: a cap is per process and would outlive this run (a second
    # `train()` in the same Python process, or the next run of a benchmark).
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    return cap


def _fwd_bwd(module: nn.Module, ids: torch.Tensor) -> None:
    module(input_ids=ids, labels=ids, scale=1.0 / ids.numel()).backward()


def _peak_bytes(module, optimizer, ids: torch.Tensor, passes: int, device) -> int | None:
    """This rank's peak allocation over `passes` forward+backward passes of `ids`; None on
    out-of-memory. The gradients and the cache are freed after."""
    try:
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(passes):
            _fwd_bwd(module, ids)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        peak = None
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return peak


def _passes(micro_batch: int, per_rank_batch: int) -> int:
    """With accumulation, every micro-batch after a step's first runs its forward while the
    gradients are held (a full model's worth: 15 GiB for an 8B in bf16), so a micro-batch
    smaller than the batch is measured over two passes: the first alone underestimates."""
    return 1 if micro_batch == per_rank_batch else 2


def fit_micro_batch(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    per_rank_batch: int,
    seq_length: int,
    vocab_size: int,
    device: torch.device,
    budget_bytes: int | None = None,
    only: int = 0,
) -> memplan.Fit | None:
    """Largest divisor of the per-rank batch (or just `only`) whose forward+backward fits
    next to the optimizer state (materialized first) with 8% of the budget (default: the whole
    GPU) kept free, with its peak; None when not even one sequence fits. Every rank takes the
    smallest rank's answer (the peak is the largest rank's at its own answer)."""
    materialize_optimizer_state(optimizer)
    budget = budget_bytes or torch.cuda.get_device_properties(device).total_memory
    fits, peak = 0, 0
    if distributed.is_replicated(module):
        # No all-reduce while probing: the gradients then stay outside DDP's buckets, as on the
        # micro-batches a step accumulates (the larger memory of the two), and a candidate
        # that fails on one rank leaves no collective half done on the others.
        distributed.set_grad_sync(module, False)
    divisors = [d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0]
    for mb in [only] if only else sorted(divisors, reverse=True):
        ids = torch.randint(0, vocab_size, (mb, seq_length), device=device)
        got = _peak_bytes(module, optimizer, ids, _passes(mb, per_rank_batch), device)
        del ids
        if got is not None and got < memplan.FIT_SHARE * budget:
            fits, peak = mb, got
            break
    # Every rank must run the same number of micro-batches (their collectives pair up).
    fits = distributed.min_over_ranks(fits, device)
    if not fits:
        return None
    peak = int(distributed.all_reduce_max(torch.tensor([peak], device=device)).item())
    return memplan.Fit(fits, peak)


def probe_micro_batch(module, optimizer, **sizes) -> int | None:
    """`fit_micro_batch`'s micro-batch alone (None: not even one sequence fits)."""
    fit = fit_micro_batch(module, optimizer, **sizes)
    return fit.micro_batch if fit else None


def _tokens_per_s(module: nn.Module, optimizer, mb: int, seq_length: int, vocab_size: int, device):
    """Forward+backward throughput at one micro-batch: one warm-up pass, then two timed."""
    ids = torch.randint(0, vocab_size, (mb, seq_length), device=device)
    _fwd_bwd(module, ids)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(2):
        _fwd_bwd(module, ids)
    torch.cuda.synchronize(device)
    elapsed = torch.tensor([time.perf_counter() - t0], device=device)
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return 2 * ids.numel() / distributed.all_reduce_max(elapsed).item()


class MemoryPlan(NamedTuple):
    micro_batch: int
    checkpointing: bool
    note: str
    offload: bool = False  # offloaded checkpoints (--activation-offload on)
    tiled_chunk: int = 0  # tokens per MLP tile; 0: the MLP is not tiled
    offload_keep: int = 0  # the last layers whose inputs stay on the GPU (with offload)

    def resolved(self) -> dict:
        """The levers the plan resolves in the run's config (by flat name), besides the
        micro-batch and checkpointing."""
        return dict(
            activation_offload="on" if self.offload else "off",
            activation_offload_keep=self.offload_keep,
            tiled_mlp="on" if self.tiled_chunk else "off",
            tiled_mlp_chunk=self.tiled_chunk,
        )


def needs_memory_plan(cfg: RunConfig, micro_batch: int | None, device: torch.device) -> bool:
    """On a GPU, a micro-batch that is auto, or a memory lever that is (issue 26)."""
    levers = lever_settings(cfg)
    return device.type == "cuda" and (micro_batch is None or "auto" in levers.values())


def lever_settings(cfg: RunConfig) -> dict:
    """--activation-offload, --tiled-mlp and --tiled-mlp-chunk as `plan_memory` takes them."""
    m = cfg.model
    return dict(offload=m.activation_offload, tiled_mlp=m.tiled_mlp, tiled_chunk=m.tiled_mlp_chunk)


class _GpuMeasure:
    """memplan.Measure on this GPU: puts the model in a candidate's state, then probes it."""

    def __init__(self, module, optimizer, state, chunk, *, per_rank_batch, seq_length, **sizes):
        self.module, self.optimizer, self.state, self.chunk = module, optimizer, state, chunk
        self.per_rank_batch, self.seq_length, self.sizes = per_rank_batch, seq_length, sizes
        self.smallest = sizes.get("only") or 1  # the micro-batch of the longest-length probes

    def use(self, cand: memplan.Candidate) -> None:
        switch_levers(self.module.lm, self.state, cand, self.chunk)
        self.state = cand

    def fit(self, cand):
        self.use(cand)
        return fit_micro_batch(
            self.module,
            self.optimizer,
            per_rank_batch=self.per_rank_batch,
            seq_length=self.seq_length,
            **self.sizes,
        )

    def speed(self, cand, micro_batch):
        self.use(cand)
        vocab, device = self.sizes["vocab_size"], self.sizes["device"]
        return _tokens_per_s(
            self.module, self.optimizer, micro_batch, self.seq_length, vocab, device
        )

    def peak(self, cand, seq_length):
        self.use(cand)
        vocab, device = self.sizes["vocab_size"], self.sizes["device"]
        ids = torch.randint(0, vocab, (self.smallest, seq_length), device=device)
        passes = _passes(self.smallest, self.per_rank_batch)
        got = _peak_bytes(self.module, self.optimizer, ids, passes, device)
        worst = distributed.all_reduce_max(
            torch.tensor([-1 if got is None else got], device=device)
        )
        fails = distributed.all_reduce_max(torch.tensor([int(got is None)], device=device))
        return None if fails.item() else int(worst.item())


def current_levers(hf_model) -> memplan.Candidate:
    """The memory levers the model has on now (as build_module, or an earlier plan, left it)."""
    off, tiled = offload.enabled(hf_model), tiling.enabled(hf_model)
    # What HF's is_gradient_checkpointing reads (deprecated in transformers 5 for a new name).
    ckpt = any(getattr(m, "gradient_checkpointing", False) is True for m in hf_model.modules())
    return memplan.Candidate(ckpt or off, off, tiled)


def switch_levers(hf_model, old: memplan.Candidate, new: memplan.Candidate, chunk: int) -> None:
    """From one candidate's memory levers to another's: tiled MLP, offloaded checkpoints
    (which checkpoint their layers themselves, and give them back their earlier checkpointing
    when undone), HF's activation checkpointing."""
    if new.tiling != old.tiling:
        tiling.apply(hf_model, chunk if new.tiling else 0)
    if new.offload != old.offload:
        offload.apply(hf_model, new.offload, compile_layers=_compiled_layers(hf_model))
    if not new.offload and (old.offload or new.checkpointing != old.checkpointing):
        set_checkpointing(hf_model, new.checkpointing)


def _compiled_layers(hf_model) -> bool:
    """As build_module applies offload: over compiled layers, the offloaded checkpoint
    compiles each layer's forward inside it (in the default mode)."""
    return any(
        getattr(layer, "_compiled_call_impl", None) is not None
        for layer in distributed.decoder_layers(hf_model)
    )


def plan_keep(
    module, choice: memplan.Choice, seq_length: int, budget_bytes: int, choose: bool
) -> tuple[int, str]:
    """Offload chosen: how many last layers keep their inputs on the GPU, and a note. With
    --activation-offload auto (`choose`), as many as the probe's headroom holds, and the
    others within the host's memory (memplan.choose_keep), applied here; with on, the
    --activation-offload-keep given (the build checks the host memory after the plan)."""
    hf = module.lm
    if not choose:
        return offload.kept(hf), ""
    layers = len(distributed.decoder_layers(hf))
    per_layer = offload.layer_input_bytes(hf, choice.micro_batch, seq_length)
    headroom = int(memplan.FIT_SHARE * budget_bytes) - choice.peak_bytes
    available = distributed.broadcast_object(offload.host_available())
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    try:
        keep = memplan.choose_keep(layers, per_layer, headroom, offload.host_room(available), ranks)
    except memplan.NothingFits as e:
        raise SftuneError(e.message) from None
    offload.apply(hf, True, keep=keep.keep, compile_layers=_compiled_layers(hf))
    return keep.keep, f"; {keep.note}; {available / 2**30:.1f} GiB available"


def tile_chunk(hf_model, chunk: int, seq_length: int) -> int:
    """--tiled-mlp-chunk, or for 0 tiling's default for the model's sizes."""
    if chunk:
        return chunk
    c = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else None
    c = c or hf_model.config
    return tiling.default_chunk(c.hidden_size, c.intermediate_size, seq_length)


def plan_memory(
    module: CausalLMWithLoss,
    optimizer: torch.optim.Optimizer,
    *,
    per_rank_batch: int,
    seq_length: int,
    vocab_size: int,
    device: torch.device,
    budget_bytes: int,
    checkpointing: bool,
    offload: str = "off",
    tiled_mlp: str = "off",
    tiled_chunk: int = 0,
    micro_batch: int = 0,
) -> MemoryPlan:
    """The micro-batch and memory levers (activation checkpointing, offloaded checkpoints,
    tiled MLP) for a run whose micro-batch is "auto" on a GPU: the fastest candidate the
    settings allow that fits, timed against a slower one where that fits a larger micro-batch
    (memplan.decide). The model is left in the chosen state. Nothing fitting is a one-line
    error naming the longest sequence that would fit within the budget.

    `micro_batch`: a --micro-batch-size given (0: auto), for which only the levers that are
    "auto" are planned (`needs_memory_plan`).
    """
    cands = memplan.candidates(checkpointing, offload, tiled_mlp)
    start = current_levers(module.lm)
    chunk = tile_chunk(module.lm, tiled_chunk, seq_length) if any(c.tiling for c in cands) else 0
    measure = _GpuMeasure(
        module,
        optimizer,
        start,
        chunk,
        per_rank_batch=per_rank_batch,
        seq_length=seq_length,
        vocab_size=vocab_size,
        device=device,
        budget_bytes=budget_bytes,
        only=micro_batch,
    )
    off = [
        f"--{flag} auto"
        for flag, v in (("activation-offload", offload), ("tiled-mlp", tiled_mlp))
        if v == "off"
    ]
    try:
        choice = memplan.decide(
            cands,
            per_rank_batch=per_rank_batch,
            seq_length=seq_length,
            budget_bytes=budget_bytes,
            measure=measure,
            settings_off=tuple(off),
            micro_batch=micro_batch,
        )
    except memplan.NothingFits as e:
        raise SftuneError(e.message) from None
    measure.use(choice.candidate)
    c = choice.candidate
    note = choice.note + ("" if expandable_segments() else EXPANDABLE_OFF)
    if c.tiling:
        note += f"; MLP tiles of {chunk:,} tokens"
    keep = 0
    if c.offload:
        keep, keep_note = plan_keep(module, choice, seq_length, budget_bytes, offload == "auto")
        note += keep_note
    return MemoryPlan(
        choice.micro_batch, c.checkpointing, note, c.offload, chunk if c.tiling else 0, keep
    )


EXPANDABLE_OFF = (
    "; the allocator's expandable segments are off (PYTORCH_CUDA_ALLOC_CONF): near the cap "
    "GiBs may sit reserved but unallocated (`sftune train` turns them on)"
)


def expandable_segments() -> bool:
    """Whether the CUDA caching allocator grows segments instead of fragmenting (as `sftune
    train` sets it, before torch starts: cli.py)."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_ALLOC_CONF", ""))
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def set_checkpointing(hf_model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer in backward (non-reentrant), or stop doing so."""
    if on:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        hf_model.config.use_cache = False
    else:
        hf_model.gradient_checkpointing_disable()


def resolve_micro_batch(cfg: RunConfig, world: World, device: torch.device) -> int | None:
    """--micro-batch-size, or for 0 (auto) on a CPU the largest divisor of the per-rank batch
    up to 8; None on a GPU, where `plan_memory` finds it."""
    if cfg.optim.micro_batch_size:
        return cfg.optim.micro_batch_size
    per_rank = cfg.optim.batch_size // world.world_size
    if device.type == "cuda":
        return None
    return max(d for d in range(1, min(per_rank, 8) + 1) if per_rank % d == 0)


def choose_compile_step(cfg: RunConfig, sharded: bool) -> bool:
    """--compile-step, on plain (not FSDP-sharded) parameters only."""
    if cfg.optim.compile_step and sharded:
        raise ConfigError("--compile-step: not supported with FSDP (use --dist ddp or none)")
    return cfg.optim.compile_step
