"""Everything a run needs, built once: `build(cfg) -> Run`, then the loop only reads it.

    run = build(cfg)        # process group, model + loss module, data, sampler, optimizer,
                            # scheduler, probed micro-batch, run directory, logger
    run.cfg                 # the resolved config: every "auto" replaced by what it became;
                            # printed at the start and saved as <output-dir>/config.yaml

Features plug in here, at build time (a model transform, a renderer), never as flags threaded
through the step. The order matters only where noted: FP8 linears, the loss wrapper,
activation checkpointing, per-layer compile and DDP or FSDP2 are applied in that order
(`build_module`), and the micro-batch is probed once the optimizer's state exists
(`resolve_micro_batch`).
"""

from __future__ import annotations

import datetime
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from sftune import config as config_mod
from sftune import tasks
from sftune.config import RunConfig
from sftune.data import PackedSFTDataset
from sftune.data.chat_templates import read_chat_template, set_chat_template
from sftune.data.formats import CHAT_FORMATS, parse_fields, peek
from sftune.data.pair_dataset import PackedPairDataset, require_pairs
from sftune.data.preference import CONVERSATIONAL, check_not_pairs, parse_pair_fields, render_pair
from sftune.data.sampler import StepSampler
from sftune.errors import ConfigError, DataError, SftuneError
from sftune.models import (
    dtype_name,
    load_model_and_tokenizer,
    model_flops_per_token,
    quiet_libraries,
)
from sftune.objectives import reference
from sftune.objectives.preference import build_objective
from sftune.paths import cache_root
from sftune.train import checkpoint, distributed, harness, rundir
from sftune.train.distributed import World
from sftune.train.metrics import MetricsLogger
from sftune.train.module import (
    build_module,
    choose_compile_step,
    gpu_budget,
    lever_settings,
    needs_memory_plan,
    plan_memory,
    resolve_micro_batch,
)
from sftune.train.optim import build_optimizer
from sftune.transforms import fp8, lora, offload

# Dense bf16 peak of the GPUs people train on (MFU's denominator).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
# Validation on 2 CPU cores takes ~1 s per 256-token sequence: 64 keep a pass near a minute
# (the old cap of 16 micro-batches was 32 to 128 sequences, by the micro-batch chosen).
CPU_EVAL_MAX_SEQUENCES = 64
RUN_MARKERS = rundir.RUN_MARKERS  # what makes a directory hold a run (never overwritten)


@dataclass(frozen=True)
class Run:
    """The complete, built state of a run. Its fields are never reassigned; the optimizer,
    scheduler, sampler and logger change inside as the loop steps them."""

    cfg: RunConfig  # resolved
    world: World
    device: torch.device
    output_dir: Path
    resume_from: Path | None  # the checkpoint --resume named (or "latest" found), else None
    hf_model: Any  # with --lora, the adapters are injected into it (in place)
    adapter: Any  # the PeftModel around hf_model with --lora/--qlora, else None
    source: str  # the local directory the base was loaded from
    tokenizer: Any
    module: torch.nn.Module
    dist: str  # "none", "ddp" or "fsdp"
    varlen: bool  # flash-attn's variable-length path: batches are flattened to (1, B*T)
    objective: Any  # objectives/preference.py: what a step's loss is (SFT's CE, DPO, ...)
    train_data: PackedSFTDataset | PackedPairDataset  # the objective's data kind
    val_data: PackedSFTDataset | PackedPairDataset
    sampler: StepSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    logger: MetricsLogger
    sample_prompts: tuple[SamplePrompt, ...]  # validation documents to generate from
    prompt_format: str  # "alpaca" or "chat": how `sftune generate` should render prompts
    task_specs: tuple[tasks.TaskSpec, ...]  # --eval-tasks, resolved (none: no task evaluation)
    task_tokenizer: Any  # lm-eval's own copy of the tokenizer (None without tasks)
    flops_per_token: float | None
    peak_flops: float | None
    notes: tuple[str, ...]
    data_digests: dict  # the data files' fingerprints, saved in every checkpoint (rundir)
    lock: rundir.RunLock | None  # rank 0's lock on the run directory, released by close()

    @property
    def sharded(self) -> bool:
        """FSDP2: parameters are gathered in step on every rank (generation runs on all)."""
        return self.dist == "fsdp"

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.optim.micro_batch_size

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.train_data) * self.cfg.data.seq_length

    def describe(self) -> str:
        c = self.cfg
        accum = c.optim.batch_size // self.world.world_size // self.micro_batch_size
        lines = [
            f"sftune: {self.total_steps} steps ({self.sampler.steps_per_epoch} per epoch) of "
            f"{c.optim.batch_size} x {c.data.seq_length} tokens = {self.world.world_size} rank(s) "
            f"x {accum} accumulation x micro-batch {self.micro_batch_size}; lr {c.optim.lr:g}, "
            f"warmup {c.optim.warmup_ratio:g}, cosine",
            *[f"sftune: {n}" for n in self.notes],
            f"sftune: output {self.output_dir} (resolved config: config.yaml)",
        ]
        return "\n".join(lines)

    def close(self) -> None:
        try:
            self.logger.close()
        finally:
            if self.lock is not None:
                self.lock.release()
            distributed.shutdown()


# ----------------------------------------------------------------------------- small choices


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def attention_request(cfg: RunConfig, device: torch.device) -> str:
    """--attn, except that document masks on a GPU without flash-attn get FlexAttention.

    SDPA with a block-diagonal mask falls back from the flash kernel; FlexAttention skips the
    masked blocks (measured 25% faster at 4,096 tokens, docs/BENCHMARKS.md). Preference pairs
    always carry their mask (the rejected response skips the chosen one), which flash-attn's
    varlen path cannot express: FlexAttention on a GPU, SDPA with the mask on a CPU.
    """
    if cfg.loss.objective != "sft" and cfg.model.attn == "auto":
        return "flex_attention" if device.type == "cuda" else "sdpa"
    if (
        cfg.model.attn == "auto"
        and cfg.data.doc_mask == "on"
        and device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is None
    ):
        return "flex_attention"
    return cfg.model.attn


def objective_note(cfg: RunConfig) -> str | None:
    """The build's line on a preference objective (None for SFT)."""
    c = cfg.loss
    if c.objective == "sft":
        return None
    settings = [f"beta {c.beta:g}"]
    if c.objective == "simpo":
        settings.append(f"gamma {c.simpo_gamma:g}")
    if c.nll_weight:
        settings.append(f"+ {c.nll_weight:g} x chosen NLL (RPO)")
    reference_note = (
        "reference-free"
        if c.objective in ("simpo", "orpo")
        else f"reference {c.ref_model or 'the starting model'} (log-probs precomputed)"
    )
    return (
        f"objective {c.objective} ({', '.join(settings)}; {reference_note}); pairs packed "
        "prompt | chosen | rejected, the prompt once, with their attention mask"
    )


def doc_mask_on(cfg: RunConfig, attn: str) -> bool:
    if cfg.data.doc_mask == "auto":
        return attn in ("flash_attention_2", "flex_attention")
    return cfg.data.doc_mask == "on"


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    return max(1, math.ceil(cfg.optim.epochs * steps_per_epoch))


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- run directory


def plan_output_dir(cfg: RunConfig, world: World) -> Path:
    """The run directory's path (its files are written later, once everything that can fail
    on input has been built). Never an earlier run's directory unless resuming it, never a
    directory of the user's own files (rundir.check_output_dir)."""
    name = cfg.log.output_dir
    if name is None:
        stamp = distributed.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        name = f"runs/{stamp}"
    out = Path(name)
    rundir.check_output_dir(out, resuming=cfg.checkpoint.resume is not None)
    return out


def lock_output_dir(out: Path, world: World, resuming: bool) -> rundir.RunLock | None:
    """Rank 0 locks the run directory (creating it); every rank fails alike if it cannot."""
    lock, error = None, None
    if world.is_main:
        try:
            lock = rundir.RunLock.acquire(out)
            # Again under the lock: a run that started with this one may have written first.
            rundir.check_output_dir(out, resuming=resuming)
        except SftuneError as e:
            if lock is not None:
                lock.release()
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise SftuneError(error)
    return lock


def create_output_dir(out: Path, cfg: RunConfig, world: World) -> None:
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, out / "config.yaml")
    distributed.barrier()


# ----------------------------------------------------------------------------- data


class Datasets(NamedTuple):
    train: PackedSFTDataset
    val: PackedSFTDataset


def data_paths(cfg: RunConfig, world: World) -> tuple[str, str | None]:
    """--train-data / --val-data, or the embedded demo set (written once, by rank 0)."""
    if cfg.data.train_data is not None:
        return cfg.data.train_data, cfg.data.val_data
    from sftune.data.demo import ensure_demo_dataset

    if world.is_main:
        ensure_demo_dataset(cache_root())
    distributed.barrier()
    train, val = map(str, ensure_demo_dataset(cache_root()))
    return train, cfg.data.val_data or val


def check_data_kind(cfg: RunConfig, train_path: str, val_path: str | None) -> str:
    """The prompt format, "alpaca" or "chat", of the objective's data: preference pairs for
    dpo/ipo/simpo/orpo, SFT records for sft (each refused in the other's place, with the flag
    that reads it)."""
    paths = [p for p in (train_path, val_path) if p]
    if cfg.loss.objective == "sft":
        for path in paths:
            check_not_pairs(path)
        fmt = peek(train_path, parse_fields(cfg.data.fields))
        return "chat" if fmt in CHAT_FORMATS else "alpaca"
    fields = parse_pair_fields(cfg.data.fields)
    fmt, *_ = [require_pairs(path, fields) for path in paths]
    return "chat" if fmt == CONVERSATIONAL else "alpaca"


def build_datasets(
    cfg: RunConfig, tokenizer, world: World, doc_mask: bool, train_path: str, val_path: str | None
) -> Datasets:
    """Train and validation sets of the objective's data kind (packed SFT documents, or packed
    preference pairs); rank 0 builds the token cache first, the others read it."""
    if not val_path and cfg.data.val_fraction <= 0:
        raise ConfigError("no --val-data and --val-fraction 0: nothing to validate on")
    split = {} if val_path else dict(holdout_fraction=cfg.data.val_fraction)

    def make(path, shuffle, **kw):
        if cfg.loss.objective != "sft":
            return PackedPairDataset(
                tokenizer,
                path,
                cfg.data.seq_length,
                shuffle,
                seed=cfg.optim.seed,
                fields=parse_pair_fields(cfg.data.fields),
                truncation=cfg.data.truncation,
                single_turn=cfg.data.single_turn,
                verbose=world.is_main,
                **kw,
            )
        return PackedSFTDataset(
            tokenizer,
            path,
            cfg.data.seq_length,
            shuffle,
            seed=cfg.optim.seed,
            fields=parse_fields(cfg.data.fields),
            train_on=cfg.data.train_on,
            response_only=cfg.data.response_only,
            system_prompt=cfg.data.system_prompt,
            packing=cfg.data.packing,
            overlong=cfg.data.overlong,
            position_ids=doc_mask,
            verbose=world.is_main,
            **kw,
        )

    def make_both():
        train = make(train_path, cfg.data.shuffle, **split)
        val = make(val_path, False) if val_path else make(train_path, False, holdout=True, **split)
        return train, val

    if world.is_main:
        train, val = make_both()
    distributed.barrier()  # the others load what rank 0 just cached
    if not world.is_main:
        train, val = make_both()
    return Datasets(train, val)


class SamplePrompt(NamedTuple):
    """A validation document the trainer generates from at each evaluation."""

    shown: str  # on the console: the prompt, or enough of a chat to tell two chats apart
    rendered: str  # the prompt part, as the model is given it
    record: dict[str, Any]  # for samples.jsonl: a chat's whole conversation and its answer


def sample_prompts(n: int, val: PackedSFTDataset, tokenizer) -> tuple[SamplePrompt, ...]:
    """`n` validation documents, spread over the set, ready to generate from."""
    from sftune.data import render_record

    if isinstance(val, PackedPairDataset):
        return pair_sample_prompts(n, val, tokenizer)
    out = []
    for r in val.sample_records(n):
        prompt_part, _ = render_record(r, tokenizer)
        if r.messages is None:
            record = {"prompt": r.prompt, "reference": r.response}  # the whole prompt
            out.append(SamplePrompt(repr(r.prompt[:60]), prompt_part, record))
            continue
        last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
        record = {"messages": list(r.messages[:last]), "reference": r.messages[last]}
        if r.tools:
            record["tools"] = list(r.tools)
        out.append(SamplePrompt(chat_summary(r.messages[:last], r.tools), prompt_part, record))
    return tuple(out)


def pair_sample_prompts(n: int, val: PackedPairDataset, tokenizer) -> tuple[SamplePrompt, ...]:
    """`n` held-out pairs' prompts; samples.jsonl keeps the chosen and rejected responses."""
    out = []
    for pair in val.sample_records(n):
        prompt_part, _, _ = render_pair(pair, tokenizer)
        record = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
        if pair.form == CONVERSATIONAL:
            record = {k: list(v) for k, v in record.items()}
            shown = chat_summary(record["prompt"], pair.tools)
        else:
            shown = repr(pair.prompt[-60:] if pair.form == "hh" else pair.prompt[:60])
        out.append(SamplePrompt(shown, prompt_part, record))
    return tuple(out)


def chat_summary(messages, tools=None) -> str:
    """A chat's prompt in one line, enough to tell two apart that end alike: the system
    prompt's start, the number of messages, the tools, and the user turn being answered.

    >>> chat_summary([{"role": "system", "content": "You are terse."},
    ...               {"role": "user", "content": "Hi"}], [{"function": {"name": "add"}}])
    "system 'You are terse.' | 2 messages | tools add | user 'Hi'"
    """
    parts = []
    if messages and messages[0]["role"] == "system":
        parts.append(f"system {messages[0]['content'][:30]!r}")
    parts.append(f"{len(messages)} message{'s' if len(messages) != 1 else ''}")
    if tools:
        names = [(t.get("function") or t).get("name", "?") for t in tools]
        parts.append("tools " + ",".join(map(str, names)))
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    parts.append(f"user {user[:60]!r}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- model, optimizer


def load_model(cfg: RunConfig, device: torch.device):
    """(hf_model, tokenizer, ModelInfo, PeftModel or None): bf16-mixed loads fp32 weights for
    bf16 autocast; --qlora loads a 4-bit base; --lora/--qlora inject the adapters."""
    load_dtype = "fp32" if cfg.model.dtype == "bf16-mixed" else cfg.model.dtype
    template = cfg.data.chat_template  # read first: a bad --chat-template fails before the load
    template_text = read_chat_template(template) if template else None
    hf_model, tokenizer, info = load_model_and_tokenizer(
        cfg.model.model,
        device=device,
        dtype=load_dtype,
        attn_implementation=attention_request(cfg, device),
        quantization=lora.quantization_kwargs(cfg),
        rope_scaling=cfg.model.rope_scaling,  # issue 26: into final/'s config.json too
    )
    set_chat_template(tokenizer, template, template_text)  # so final/'s tokenizer carries it
    adapter = lora.apply_lora(hf_model, cfg) if lora.enabled(cfg) else None
    return hf_model, tokenizer, info, adapter


def build_optimization(cfg: RunConfig, built, num_items: int, world: World, device: torch.device):
    """(sampler, total steps, optimizer, scheduler, a note on the optimizer)."""
    compile_step = choose_compile_step(cfg, built.sharded)
    package = config_mod.EIGHT_BIT_OPTIMIZERS.get(cfg.optim.optimizer)  # None: torch AdamW
    if package and built.sharded:
        raise ConfigError(
            f"--optimizer {cfg.optim.optimizer}: not supported with FSDP2 "
            "(use --dist ddp or none, or adamw)"
        )
    sampler = StepSampler(
        num_items,
        cfg.optim.batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.optim.seed,
        rank=world.rank,
        world_size=world.world_size,
    )
    steps = total_steps(cfg, sampler.steps_per_epoch)
    optimizer, scheduler = build_optimizer(
        list(built.module.parameters()), cfg.optim, steps, device, compiled=compile_step
    )
    if package:
        note = f"optimizer: AdamW8bit ({package}: both moments in 8 bits, a scale per 256 values)"
    elif compile_step:
        note = "optimizer: clipping + AdamW compiled together"
    else:
        note = f"optimizer: {'fused ' if device.type == 'cuda' else ''}AdamW"
    return sampler, steps, optimizer, scheduler, note


# ----------------------------------------------------------------------------- build


def build(cfg: RunConfig) -> Run:
    """Everything for `cfg`, in the order that fails cheapest first; see the module doc.

    With --resume, the saved run's settings with the changes that may be made
    (rundir.plan_resume); the run directory is locked for the run (released by Run.close).
    """
    cfg.validate()
    resumed = rundir.plan_resume(config_mod.flat_values(cfg)) if cfg.checkpoint.resume else None
    cfg = resumed.cfg if resumed else cfg
    quiet_libraries(cfg.log.verbose)
    world = distributed.init(
        "cuda" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu",
        group=cfg.dist.dist in ("ddp", "fsdp") or cfg.dist.cpu_offload,
    )
    config_mod.check_world_size(cfg, world.world_size)
    device = distributed.resolve_device(cfg.model.device, world)
    # Before anything is allocated, so the model itself counts against --max-memory-gib.
    budget = gpu_budget(device, cfg.model.max_memory_gib) if device.type == "cuda" else None
    torch.manual_seed(cfg.optim.seed)
    output_dir = plan_output_dir(cfg, world)
    resuming = cfg.checkpoint.resume is not None
    # issue 26: --plan-only neither creates nor locks the run directory
    lock = None if cfg.log.plan_only else lock_output_dir(output_dir, world, resuming=resuming)
    try:
        return _build(cfg, resumed, world, device, budget, output_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(cfg, resumed, world, device, budget, output_dir, lock) -> Run:
    """build() once the run directory is locked."""
    resume_from = resumed.checkpoint if resumed else None  # None: none, or starting over
    train_path, val_path = data_paths(cfg, world)
    digests = rundir.data_digests(train_path, val_path)
    if resume_from is not None:  # before the model loads
        paths = {"train_data": train_path, "val_data": val_path}
        rundir.check_data(digests, resumed.trainer.get("data"), paths)
    prompt_format = check_data_kind(cfg, train_path, val_path)

    lora.check_available(cfg, device, world.world_size)
    task_specs = build_task_specs(cfg)
    fp8.check_available(cfg.model.fp8, device)
    hf_model, tokenizer, info, adapter = load_model(cfg, device)
    notes = [
        *(resumed.notes if resumed else ()),
        f"model {cfg.model.model} ({info.num_params / 1e6:.1f}M params, {info.dtype}"
        f"{' + bf16 autocast' if cfg.model.dtype == 'bf16-mixed' else ''}), attention "
        f"{info.attn_implementation}",
    ]
    if adapter is not None:
        trainable = sum(p.numel() for p in hf_model.parameters() if p.requires_grad)
        notes.append(
            f"{'QLoRA (4-bit NF4 base)' if cfg.adapter.qlora else 'LoRA'}: r {cfg.adapter.lora_r}, "
            f"alpha {cfg.adapter.lora_alpha:g} on {lora.targets(cfg)}, {trainable / 1e6:.2f}M "
            "trainable parameters"
        )
    if cfg.model.max_memory_gib and budget is None:
        notes.append("--max-memory-gib ignored: it caps GPU memory and this run is on the CPU")
    if lock is not None and lock.note:
        notes.append(lock.note)
    objective = build_objective(cfg, info.attn_implementation)
    doc_mask = doc_mask_on(cfg, info.attn_implementation) or cfg.loss.objective != "sft"
    notes.append(objective_note(cfg) or f"document-aware packing {_on_off(doc_mask)}")
    task_format = task_prompt_format(cfg, prompt_format, tokenizer)
    if task_specs:
        notes.append(_task_note(cfg, task_format))
    data = build_datasets(cfg, tokenizer, world, doc_mask, train_path, val_path)
    if len(data.train) < cfg.optim.batch_size:  # before anything is written
        raise DataError(
            train_path,
            f"{len(data.train)} packed row(s) of {cfg.data.seq_length} tokens, fewer than one "
            f"step's --batch-size {cfg.optim.batch_size}: lower --batch-size, or add data",
        )

    built = build_module(cfg, hf_model, device, world)
    notes += built.notes
    sampler, steps, optimizer, scheduler, note = build_optimization(
        cfg, built, len(data.train), world, device
    )
    notes.append(note)
    if built.fp8_all_gather:
        fp8.precompute_scales_after_steps(optimizer, built.module)
    micro = resolve_micro_batch(cfg, world, device)
    # issue 26: offloaded layers are checkpointed; the planner must not swap in plain ones
    checkpointing = cfg.model.activation_checkpointing or offload.enabled(hf_model)
    planned: dict = {}  # what the memory plan resolved (issue 26: offload, tiled MLP)
    if needs_memory_plan(cfg, micro, device):
        plan = plan_memory(
            built.module,
            optimizer,
            per_rank_batch=cfg.optim.batch_size // world.world_size,
            seq_length=cfg.data.seq_length,
            vocab_size=hf_model.get_input_embeddings().weight.shape[0],
            device=device,
            budget_bytes=budget,
            checkpointing=checkpointing,
            **lever_settings(cfg),
            micro_batch=micro or 0,
        )
        micro, checkpointing = plan.micro_batch, plan.checkpointing
        planned = plan.resolved()
        notes.append(plan.note)
    # issue 26: the offloaded inputs must fit the host's memory, checked before any step
    if (note := offload.check_host(hf_model, micro, cfg.data.seq_length)) is not None:
        notes.append(note)
    notes.append(
        checkpoint.check_disk_space(output_dir, built.module, optimizer, cfg, adapter is not None)
    )
    # Before a resume loads other weights: the starting model. A dry run plans only.
    if objective.needs_reference and not cfg.log.plan_only:
        notes += reference.attach_reference(
            cfg, built.module, adapter, info, tokenizer, device, world, data, objective, micro
        )

    resolved = config_mod.with_values(
        cfg,
        output_dir=str(output_dir),
        train_data=train_path,
        val_data=val_path,
        dtype=cfg.model.dtype if cfg.model.dtype != "auto" else dtype_name(info.dtype),
        attn=info.attn_implementation,
        compile=_on_off(built.compiled),
        fused_loss=_on_off(built.module.fused),
        doc_mask=_on_off(doc_mask),
        device=device.type,
        dist=built.dist,
        reshard_after_forward=_on_off(built.reshard_after_forward),
        micro_batch_size=micro,
        activation_checkpointing=checkpointing,
        eval_max_sequences=_eval_max_sequences(cfg, device),
        task_batch_size=cfg.tasks.task_batch_size or harness.default_batch_size(device),
        task_prompt_format=task_format,
        train_on=data.train.train_on if cfg.loss.objective == "sft" else "assistant",
        response_only=False,  # an alias, resolved into train_on
        **planned,
    )
    if not cfg.log.plan_only:  # issue 26: a dry run writes nothing
        create_output_dir(output_dir, resolved, world)
    logger = MetricsLogger(
        output_dir,
        report_to=resolved.log.backends,
        enabled=world.is_main and not cfg.log.plan_only,
        run_name=cfg.log.run_name,
        config=resolved.to_dict(),
        tokens_per_step=cfg.optim.batch_size * cfg.data.seq_length,
        resume=resume_from is not None,  # starting over: new files
    )
    # MFU's FLOPs count assumes every weight is trained; adapters skip most weight gradients.
    flops = (
        model_flops_per_token(hf_model.config, cfg.data.seq_length)
        if device.type == "cuda" and adapter is None
        else None
    )
    return Run(
        cfg=resolved,
        world=world,
        device=device,
        output_dir=output_dir,
        resume_from=resume_from,
        hf_model=hf_model,
        adapter=adapter,
        source=info.source,
        tokenizer=tokenizer,
        module=built.module,
        dist=built.dist,
        varlen=doc_mask and info.attn_implementation == "flash_attention_2",
        objective=objective,
        train_data=data.train,
        val_data=data.val,
        sampler=sampler,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=steps,
        logger=logger,
        sample_prompts=sample_prompts(cfg.log.num_samples, data.val, tokenizer),
        prompt_format=prompt_format,
        task_specs=task_specs,
        task_tokenizer=harness.eval_copy(tokenizer) if task_specs else None,
        flops_per_token=flops,
        peak_flops=_peak_flops(device),
        notes=tuple(notes),
        data_digests=digests,
        lock=lock,
    )


def build_task_specs(cfg: RunConfig) -> tuple[tasks.TaskSpec, ...]:
    """--eval-tasks with their data files checked, and lm-eval installed; () without tasks."""
    if not cfg.tasks.names:
        return ()
    specs = tasks.resolve_tasks(cfg.tasks.names, cfg.tasks.task_data, cfg.tasks.task_dir)
    tasks.check_installed()
    return tuple(specs)


def task_prompt_format(cfg: RunConfig, run_format: str, tokenizer) -> str:
    """--task-prompt-format; auto: the run's own prompt format (chat for chat records)."""
    fmt = cfg.tasks.task_prompt_format
    fmt = run_format if fmt == "auto" else fmt
    if cfg.tasks.names and fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"--task-prompt-format chat: the tokenizer of {cfg.model.model} has no chat template"
        )
    return fmt


def _task_note(cfg: RunConfig, prompt_format: str) -> str:
    every = cfg.tasks.eval_tasks_every
    limit = cfg.tasks.eval_limit
    return (
        f"task evaluation (lm-eval, rank 0): {', '.join(cfg.tasks.names)} at the start, "
        f"{f'every {every} steps, ' if every else ''}at the end; "
        f"{f'the first {limit} problems' if limit else 'all problems'} of each; "
        f"prompts in the {prompt_format} format"
    )


def _eval_max_sequences(cfg: RunConfig, device: torch.device) -> int:
    if cfg.log.eval_max_sequences is not None:
        return cfg.log.eval_max_sequences
    return 0 if device.type == "cuda" else CPU_EVAL_MAX_SEQUENCES


# ----------------------------------------------------------------------------- issue 26: planner


def plan_only(cfg: RunConfig) -> int:
    """`sftune train ... --plan-only`: everything built as for training (the memory plan
    probed on a GPU), then the plan and the resolved config printed; nothing trained, no run
    directory created or written. Exit status 0."""
    run = build(cfg)
    try:
        if run.world.is_main:
            lines = run.describe().splitlines()[:-1]  # all but the run directory's line
            # As the run itself would save it: a config file that trains this plan.
            as_run = config_mod.with_values(run.cfg, plan_only=False)
            yaml_text = yaml.safe_dump(as_run.to_dict(), sort_keys=False)
            print(
                "\n".join(lines),
                f"sftune: plan only: nothing trained, nothing written (the run would write "
                f"{run.output_dir}); its resolved config:",
                yaml_text,
                sep="\n",
                end="",
                flush=True,
            )
    finally:
        run.close()
    return 0
