"""Everything a run needs before its first step, built by small `build_*` functions.

`build(cfg)` returns a `Setup`: the process group, device, run directory, model (wrapped with
its loss, compiled and sharded as asked), tokenizer, packed datasets, micro-batch size, logger.
"""

from __future__ import annotations

import datetime
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftune import config as config_mod
from sftune.config import RunConfig
from sftune.data import PackedSFTDataset, read_records, render_record, select_documents
from sftune.data.formats import parse_fields
from sftune.errors import ConfigError, SftuneError
from sftune.models import load_model_and_tokenizer, model_flops_per_token
from sftune.paths import cache_root
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.lm import CausalLMWithLoss, supports_fused_loss
from sftune.train.logging import ConsoleProgress, MetricsLogger

# Dense bf16 peak of the GPUs people train on (MFU's denominator).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


@dataclass
class Setup:
    cfg: RunConfig
    world: World
    device: torch.device
    output_dir: Path
    hf_model: Any
    tokenizer: Any
    module: torch.nn.Module
    train_data: PackedSFTDataset
    val_data: PackedSFTDataset
    micro_batch_size: int
    varlen: bool
    sharded: bool
    logger: MetricsLogger
    notes: list[str] = field(default_factory=list)
    sample_prompts: list[tuple[str, str]] = field(default_factory=list)
    flops_per_token: float | None = None
    peak_flops: float | None = None
    progress: Any = None
    compile_step: bool = False

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.train_data) * self.cfg.data.seq_length

    def make_progress(self, total: int, initial: int) -> ConsoleProgress:
        return ConsoleProgress(total, initial=initial, enabled=self.world.is_main)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """On CUDA with an automatic micro-batch, probe the largest one that fits."""
        if self.device.type == "cuda" and self.cfg.optim.micro_batch_size == 0:
            self.micro_batch_size = probe_micro_batch(self, optimizer)
            self.notes.append(f"micro-batch {self.micro_batch_size} (largest that fits)")

    def describe(self, steps: int, steps_per_epoch: int) -> str:
        c = self.cfg
        per_rank = c.optim.batch_size // self.world.world_size
        accum = per_rank // self.micro_batch_size
        lines = [
            f"sftune: {steps} steps ({steps_per_epoch} per epoch) of {c.optim.batch_size} x "
            f"{c.data.seq_length} tokens = {self.world.world_size} rank(s) x {accum} accumulation x "
            f"micro-batch {self.micro_batch_size}; lr {c.optim.lr:g}, warmup {c.optim.warmup_ratio:g}, cosine",
            *[f"sftune: {n}" for n in self.notes],
            f"sftune: output {self.output_dir}",
        ]
        return "\n".join(lines)

    def close(self) -> None:
        self.logger.close()
        if self.progress is not None:
            self.progress.close()
        distributed.shutdown()


def resolve_device(requested: str, world: World) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def build_output_dir(cfg: RunConfig, world: World) -> Path:
    """A new run directory, or the one being resumed. Never overwrites an earlier run."""
    name = cfg.log.output_dir
    if name is None:
        stamp = distributed.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        name = f"runs/{stamp}"
    out = Path(name)
    if cfg.checkpoint.resume is None and world.is_main and (out / "checkpoints").exists():
        raise SftuneError(
            f"{out}: already holds a run; pass --resume latest to continue it or choose another --output-dir"
        )
    distributed.barrier()
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.yaml")
    return out


def attention_request(cfg: RunConfig, device: torch.device) -> str:
    """--attn, except that document masks on a GPU without flash-attn get FlexAttention.

    SDPA with a block-diagonal mask falls back from the flash kernel; FlexAttention skips the
    masked blocks (measured 25% faster at 4,096 tokens, docs/BENCHMARKS.md).
    """
    if (
        cfg.model.attn == "auto"
        and cfg.data.doc_mask == "on"
        and device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is None
    ):
        return "flex_attention"
    return cfg.model.attn


def _doc_mask(cfg: RunConfig, attn: str) -> bool:
    if cfg.data.doc_mask == "auto":
        return attn in ("flash_attention_2", "flex_attention")
    return cfg.data.doc_mask == "on"


def build_datasets(cfg: RunConfig, tokenizer, world: World, doc_mask: bool):
    """Train and validation sets; rank 0 builds the token cache first, the others read it."""
    fields = parse_fields(cfg.data.fields)
    train_path = cfg.data.train_data
    val_path = cfg.data.val_data
    if train_path is None:
        from sftune.demo_data import ensure_demo_dataset

        if world.is_main:
            ensure_demo_dataset(cache_root())
        distributed.barrier()
        train_path, default_val = map(str, ensure_demo_dataset(cache_root()))
        val_path = val_path or default_val
    common = dict(
        seed=cfg.optim.seed,
        fields=fields,
        response_only=cfg.data.response_only,
        position_ids=doc_mask,
    )

    def make(path, shuffle, **kw):
        return PackedSFTDataset(
            tokenizer, path, cfg.data.seq_length, shuffle, verbose=world.is_main, **common, **kw
        )

    if not val_path and cfg.data.val_fraction <= 0:
        raise ConfigError("no --val-data and --val-fraction 0: nothing to validate on")
    split = {} if val_path else dict(holdout_fraction=cfg.data.val_fraction)

    def make_both():
        train = make(train_path, cfg.data.shuffle, **split)
        val = make(val_path, False) if val_path else make(train_path, False, holdout=True, **split)
        return train, val

    if world.is_main:
        train, val = make_both()
    distributed.barrier()  # the others load what rank 0 just cached
    if not world.is_main:
        train, val = make_both()
    return train, val, train_path, val_path, fields


def sample_prompts(
    cfg: RunConfig, tokenizer, train_path, val_path, fields
) -> list[tuple[str, str]]:
    """(prompt, rendered prompt part) of --num-samples validation documents."""
    n = cfg.log.num_samples
    if n == 0:
        return []
    if val_path:
        records = read_records(val_path, fields)
    else:
        records = read_records(train_path, fields)
        keep = select_documents(len(records), cfg.data.val_fraction, True, cfg.optim.seed)
        records = [records[i] for i in keep]
    # Evenly spaced through the file, so the samples cover more than its first task or topic.
    picked = [records[i * len(records) // n] for i in range(min(n, len(records)))]
    out = []
    for r in picked:
        prompt_part, _ = render_record(r, tokenizer)
        shown = r.prompt or (
            r.messages[-2]["content"] if r.messages and len(r.messages) > 1 else ""
        )
        out.append((shown, prompt_part))
    return out


def _choose(setting: str, on_cuda: bool) -> bool:
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


def build_module(cfg: RunConfig, hf_model, device: torch.device, world: World, notes: list[str]):
    """Loss wrapper, activation checkpointing, per-layer torch.compile, FSDP2: in that order."""
    fused = _choose(cfg.model.fused_loss, device.type == "cuda")
    if fused and not supports_fused_loss(hf_model):
        notes.append("fused loss off: the model's logits are not a plain linear projection")
        fused = False
    compiled = _choose(cfg.model.compile, device.type == "cuda")
    autocast = torch.bfloat16 if cfg.model.dtype == "bf16-mixed" else None
    module = CausalLMWithLoss(
        hf_model, fused=fused, autocast_dtype=autocast, compiled_loss=fused and compiled
    )
    set_sdpa_backend(cfg.model.sdpa_backend)
    if cfg.model.sdpa_backend != "auto":
        notes.append(f"SDPA kernel: {cfg.model.sdpa_backend}")
    if cfg.model.activation_checkpointing:
        hf_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        hf_model.config.use_cache = False
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
    sharded = distributed.use_fsdp(cfg.dist, world)
    if sharded:
        param_dtype = torch.bfloat16 if cfg.model.dtype == "bf16-mixed" else None
        distributed.apply_fsdp(module, hf_model, cfg.dist, param_dtype)
        notes.append(f"FSDP2 over {world.world_size} rank(s)")
    notes.append(f"loss: {'fused chunked linear+CE' if fused else 'full logits + CE'}")
    return module, sharded


def choose_compile_step(cfg: RunConfig, sharded: bool) -> bool:
    """--compile-step, which is single-device only."""
    if cfg.optim.compile_step and sharded:
        raise ConfigError("--compile-step: not supported with FSDP (more than one rank)")
    return cfg.optim.compile_step


def choose_micro_batch(cfg: RunConfig, world: World, device: torch.device) -> int:
    """Validated micro-batch; 0 (auto) is resolved later by probing on CUDA."""
    bs, ws, mb = cfg.optim.batch_size, world.world_size, cfg.optim.micro_batch_size
    if bs % ws:
        raise ConfigError(f"--batch-size {bs} is not a multiple of the world size {ws}")
    per_rank = bs // ws
    if mb:
        if per_rank % mb:
            raise ConfigError(
                f"--batch-size {bs} is not a multiple of --micro-batch-size {mb} x world size {ws}"
            )
        return mb
    if device.type == "cuda":
        return per_rank  # the probe lowers it if needed
    return max(d for d in range(1, min(per_rank, 8) + 1) if per_rank % d == 0)


def probe_micro_batch(s: Setup, optimizer: torch.optim.Optimizer) -> int:
    """Largest divisor of the per-rank batch whose forward+backward fits next to the optimizer state."""
    materialize_optimizer_state(optimizer)
    per_rank = s.cfg.optim.batch_size // s.world.world_size
    seq = s.cfg.data.seq_length
    vocab = s.hf_model.get_input_embeddings().weight.shape[0]
    total = torch.cuda.get_device_properties(s.device).total_memory
    for mb in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        ids = torch.randint(0, vocab, (mb, seq), device=s.device)
        ok = True
        try:
            torch.cuda.reset_peak_memory_stats(s.device)
            s.module(ids, ids, None, 1.0 / ids.numel()).backward()
            torch.cuda.synchronize(s.device)
            ok = torch.cuda.max_memory_allocated(s.device) < 0.92 * total
        except torch.cuda.OutOfMemoryError:
            ok = False
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        if ok:
            return mb
    raise SftuneError(
        f"out of GPU memory even at micro-batch 1 x {seq} tokens: lower --seq-length or add "
        "--activation-checkpointing (or shard over more GPUs)"
    )


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate AdamW's moments now (so the probe sees them) without changing any weight.

    A step with lr 0 and zero gradients leaves parameters and moments at exactly their
    start values; the step counters are reset so the first real step is step 1.
    """
    lrs = [g["lr"] for g in optimizer.param_groups]  # floats, or tensors (compiled step)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
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


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def build(cfg: RunConfig) -> Setup:
    cfg.validate()
    world = distributed.init(
        "cuda" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    device = resolve_device(cfg.model.device, world)
    torch.manual_seed(cfg.optim.seed)
    output_dir = build_output_dir(cfg, world)
    notes: list[str] = []
    load_dtype = "fp32" if cfg.model.dtype == "bf16-mixed" else cfg.model.dtype
    hf_model, tokenizer, info = load_model_and_tokenizer(
        cfg.model.model,
        device=device,
        dtype=load_dtype,
        attn_implementation=attention_request(cfg, device),
    )
    notes.append(
        f"model {cfg.model.model} ({info.num_params / 1e6:.1f}M params, {info.dtype}"
        f"{' + bf16 autocast' if cfg.model.dtype == 'bf16-mixed' else ''}), attention {info.attn_implementation}"
    )
    doc_mask = _doc_mask(cfg, info.attn_implementation)
    notes.append(f"document-aware packing {'on' if doc_mask else 'off'}")
    train, val, train_path, val_path, fields = build_datasets(cfg, tokenizer, world, doc_mask)
    micro = choose_micro_batch(cfg, world, device)
    module, sharded = build_module(cfg, hf_model, device, world, notes)
    compile_step = choose_compile_step(cfg, sharded)
    notes.append(
        "optimizer: clipping + AdamW compiled together"
        if compile_step
        else f"optimizer: {'fused ' if device.type == 'cuda' else ''}AdamW"
    )
    logger = MetricsLogger(
        output_dir,
        report_to=[r.strip() for r in cfg.log.report_to.split(",") if r.strip()],
        enabled=world.is_main,
        run_name=cfg.log.run_name,
        config=cfg.to_dict(),
        tokens_per_step=cfg.optim.batch_size * cfg.data.seq_length,
        resume=cfg.checkpoint.resume is not None,
    )
    flops = (
        model_flops_per_token(hf_model.config, cfg.data.seq_length)
        if device.type == "cuda"
        else None
    )
    return Setup(
        cfg=cfg,
        world=world,
        device=device,
        output_dir=output_dir,
        hf_model=hf_model,
        tokenizer=tokenizer,
        module=module,
        train_data=train,
        val_data=val,
        micro_batch_size=micro,
        varlen=doc_mask and info.attn_implementation == "flash_attention_2",
        sharded=sharded,
        logger=logger,
        notes=notes,
        sample_prompts=sample_prompts(cfg, tokenizer, train_path, val_path, fields),
        flops_per_token=flops,
        peak_flops=_peak_flops(device),
        compile_step=compile_step,
    )
