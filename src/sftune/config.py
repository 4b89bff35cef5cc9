"""One typed config tree for a run.

Every field is a CLI flag (`--field-name`) and a key of a YAML config file (`--config run.yaml`),
either flat (`lr: 1e-4`) or under its section (`optim: {lr: 1e-4}`). Field names are unique
across sections so that a flat key is never ambiguous. Precedence: defaults < config file <
flags. The resolved config is saved as `config.yaml` in the run directory and in every
checkpoint.

    sftune train --model smollm2-135m --train-data train.jsonl --lr 1e-4 --max-steps 100
    sftune train --config configs/demo.yaml --max-steps 10     # a flag overrides the file
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftune.errors import ConfigError
from sftune.files import atomic_write_text
from sftune.tasks import split_names


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, its help text and, for a string setting, the allowed values
    (validated once, in `validate`, and shown as the flag's choices in --help)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    model: str = _f(
        "smollm2-135m",
        "a local Hugging Face model directory or a preset: smollm2-135m, gemma3-270m",
    )
    dtype: str = _f(
        "auto",
        "auto (bf16 on CUDA, fp32 on CPU), bf16 (pure bf16 weights and optimizer state), "
        "bf16-mixed (fp32 weights, bf16 autocast), fp32, fp16, fp64 (exact comparisons in tests)",
        ("auto", "bf16", "bf16-mixed", "fp32", "fp16", "fp64"),
    )
    attn: str = _f(
        "auto",
        "attention: auto (flash_attention_2 if installed, else sdpa), sdpa, eager, flex_attention",
        ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention"),
    )
    compile: str = _f(
        "auto",
        "torch.compile each decoder layer and the fused loss's per-chunk math: auto (on for "
        "CUDA), on, off",
        ("auto", "on", "off"),
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode for the layers: default, max-autotune-no-cudagraphs (tunes GEMMs; "
        "minutes of compile)",
        ("default", "max-autotune-no-cudagraphs"),
    )
    activation_memory_budget: float = _f(
        1.0,
        "with compile: fraction of the layers' activation memory to keep for backward; below 1 "
        "the compiler recomputes the cheapest activations instead (selective checkpointing)",
    )
    sdpa_backend: str = _f(
        "auto",
        "scaled_dot_product_attention kernel: auto (PyTorch's choice), flash, cudnn, efficient",
        ("auto", "flash", "cudnn", "efficient"),
    )
    fused_loss: str = _f(
        "auto",
        "chunked linear+cross-entropy that never holds the full logits: auto (on for CUDA), on, off",
        ("auto", "on", "off"),
    )
    activation_checkpointing: bool = _f(
        False,
        "recompute each decoder layer in backward (saves memory); with --micro-batch-size 0 "
        "on a GPU it also turns on by itself where nothing fits without it, or where it is "
        "timed faster at the larger micro-batch it allows",
    )
    max_memory_gib: float = _f(
        0.0,
        "on a GPU: use at most this many GiB (the allocator is capped there, and the micro-batch "
        "and checkpointing are chosen to fit), so a large card shows what fits a smaller one; "
        "0: the whole GPU",
    )
    fp8: str = _f(
        "off",
        "FP8 matmuls for the decoder's linear layers (torchao; GPUs of compute capability 8.9+: "
        "H100, H200, L40S): tensorwise (fastest), rowwise (more robust to outliers), off",
        ("off", "tensorwise", "rowwise"),
    )
    fp8_linears: str = _f(
        "all",
        "with --fp8, which decoder linears run in FP8: all (every one whose sizes are multiples "
        "of 16; on the 8B as fast as auto and 6 GiB leaner), auto (only those large enough to "
        "gain by torchao's size thresholds: the 8B's 4096->1024 k/v projections stay bf16)",
        ("all", "auto"),
    )
    device: str = _f("auto", "auto (cuda when available), cpu, cuda", ("auto", "cpu", "cuda"))


@dataclass
class DataConfig:
    train_data: str | None = _f(
        None, "training JSON Lines file (.jsonl / .jsonl.gz); default: the embedded demo set"
    )
    val_data: str | None = _f(
        None, "validation file; default: hold out --val-fraction of the training documents"
    )
    val_fraction: float = _f(
        0.05, "fraction of training documents held out when there is no --val-data"
    )
    fields: str | None = _f(
        None,
        "the file's keys as sftune's fields (prompt, response, messages), FILE_KEY=FIELD, "
        "comma-separated: e.g. 'question=prompt,answer=response' (GSM8K)",
    )
    seq_length: int = _f(512, "tokens per packed sequence")
    train_on: str = _f(
        "auto",
        "which labels are trained (the others are -100): all (every token), assistant (the "
        "responses; every assistant turn of a chat, its end-of-turn token included), last (a "
        "chat's final assistant turn only); auto: assistant for chats, all for prompt/response "
        "and Alpaca records",
        ("auto", "all", "assistant", "last"),
    )
    response_only: bool = _f(False, "the old name of --train-on assistant")
    system_prompt: str | None = _f(
        None, "a system message for every chat that has none (chats only; kept where present)"
    )
    doc_mask: str = _f(
        "auto",
        "document-aware packing (no attention across documents): auto (on where the attention "
        "implementation supports it: flash_attention_2, flex_attention), on, off",
        ("auto", "on", "off"),
    )
    shuffle: bool = _f(True, "shuffle documents before packing and sequences every epoch")


# The 8-bit --optimizer choices and the package each needs (its pip extra is the choice's name).
EIGHT_BIT_OPTIMIZERS = {"adamw8bit": "torchao", "adamw8bit-bnb": "bitsandbytes"}


@dataclass
class OptimConfig:
    batch_size: int = _f(32, "sequences per optimizer step (all ranks together)")
    micro_batch_size: int = _f(
        0, "sequences per forward pass per rank; 0: largest that fits (GPU) or up to 8 (CPU)"
    )
    epochs: float = _f(1.0, "passes over the training set (ignored when --max-steps > 0)")
    max_steps: int = _f(0, "optimizer steps; 0: from --epochs")
    lr: float = _f(2e-5, "peak learning rate")
    min_lr_ratio: float = _f(0.0, "cosine decay ends at min_lr_ratio * lr")
    warmup_ratio: float = _f(0.03, "fraction of the steps with linear warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    optimizer: str = _f(
        "adamw",
        "adamw (torch's; its moments in the weights' dtype); adamw8bit (torchao's AdamW8bit: "
        "both moments in 8 bits with a scale per 256 values, 2 bytes per parameter instead of "
        "4 in bf16 or 8 in fp32; pip install 'sftune[adamw8bit]'); adamw8bit-bnb (the same "
        "scheme from bitsandbytes, one fused CUDA kernel per tensor; pip install "
        "'sftune[adamw8bit-bnb]'). The 8-bit ones: one process or DDP",
        ("adamw", "adamw8bit", "adamw8bit-bnb"),
    )
    compile_step: bool = _f(
        False,
        "torch.compile gradient clipping and the AdamW update together (one GPU): for Llama 3.1 "
        "8B, 18 ms less optimizer time per step (+0.6% tokens/s) after about 90 s of compiling, "
        "so it pays off only in runs of thousands of steps; off: torch's fused AdamW on CUDA",
    )
    seed: int = _f(0, "seed for data order, held-out split and initialisation")


@dataclass
class LogConfig:
    output_dir: str | None = _f(None, "run directory; default runs/<timestamp>")
    log_every: int = _f(10, "optimizer steps between train-loss log lines")
    eval_every: int = _f(0, "optimizer steps between validation passes (0: only at start and end)")
    eval_max_batches: int | None = _f(
        None,
        "validation micro-batches per pass (the first ones of the validation set, the same every "
        "time); unset: all on a GPU, 16 on a CPU; 0: all",
    )
    num_samples: int = _f(2, "generations from validation prompts at each evaluation")
    max_new_tokens: int = _f(64, "tokens generated per sample")
    report_to: str = _f("", "comma-separated: wandb, tensorboard")
    run_name: str | None = _f(None, "name for wandb / tensorboard")
    verbose: bool = _f(False, "show the libraries' own progress bars and warnings too")

    @property
    def backends(self) -> list[str]:
        """--report-to as a list: [], ["wandb"], ["wandb", "tensorboard"], ..."""
        return [b.strip() for b in self.report_to.split(",") if b.strip()]


@dataclass
class CheckpointConfig:
    save_every: int = _f(
        0,
        "optimizer steps between checkpoints (model + optimizer state, to resume from); 0: only "
        "when a run is interrupted (a finished run then keeps just final/)",
    )
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    resume: str | None = _f(
        None,
        "continue a run: the latest checkpoint in --output-dir (bare --resume, or 'latest'), "
        "or a checkpoint directory",
    )
    save_final: bool = _f(True, "save model and tokenizer to <output-dir>/final")


@dataclass
class LoraConfig:
    lora: bool = _f(False, "train LoRA adapters (peft) on a frozen base instead of every weight")
    qlora: bool = _f(
        False, "LoRA on a 4-bit NF4 base (double quantization, bf16 compute; one CUDA GPU)"
    )
    lora_r: int = _f(16, "adapter rank")
    lora_alpha: float = _f(32.0, "adapter scale numerator: the update is B A * alpha / r")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    lora_targets: str = _f(
        "all-linear",
        "comma-separated module names to adapt (e.g. q_proj,v_proj); all-linear: every linear "
        "layer of the decoder blocks (not the output projection)",
    )


@dataclass
class DistConfig:
    dist: str = _f(
        "auto",
        "how the ranks of torchrun hold the model: auto (ddp when weights, gradients and AdamW "
        "state take at most 40% of one GPU, else fsdp; none for one process), ddp (replicated, "
        "gradients all-reduced), fsdp (FSDP2: parameters, gradients and optimizer state sharded), "
        "none (one process, nothing wrapped)",
        ("auto", "ddp", "fsdp", "none"),
    )
    reshard_after_forward: str = _f(
        "auto",
        "FSDP: free each layer's gathered parameters after its forward and gather them again for "
        "its backward (saves memory, costs a gather): auto (on only when the model would not fit "
        "replicated), on, off",
        ("auto", "on", "off"),
    )
    reduce_fp32: bool = _f(False, "FSDP: reduce gradients in fp32")
    cpu_offload: bool = _f(False, "FSDP: keep parameters and optimizer state on the CPU")


@dataclass
class TaskEvalConfig:
    eval_tasks: str = _f(
        "",
        "comma-separated lm-eval tasks to score during training, e.g. gsm8k (rank 0 runs them on "
        "the model in training; pip install 'sftune[eval]')",
    )
    eval_tasks_every: int = _f(
        0, "optimizer steps between task evaluations (0: only at the start and the end)"
    )
    eval_limit: int = _f(
        0, "problems per task and evaluation: the first K of its data, the same every time; 0: all"
    )
    task_data: str | None = _f(
        None,
        "local data of the tasks, comma-separated TASK=FILE pairs, e.g. gsm8k=test.jsonl (JSON "
        "Lines of question/answer records)",
    )
    task_dir: str | None = _f(None, "a folder of lm-eval task YAMLs to add to sftune's own (gsm8k)")
    task_batch_size: int = _f(
        0, "prompts per generation batch in task evaluation; 0: 8 on a CPU, 64 on a GPU"
    )

    @property
    def names(self) -> list[str]:
        """--eval-tasks as a list: [], ["gsm8k"], ..."""
        return split_names(self.eval_tasks)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    adapter: LoraConfig = field(default_factory=LoraConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tasks: TaskEvalConfig = field(default_factory=TaskEvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        _validate(self)
        return self


SECTIONS = [f.name for f in dataclasses.fields(RunConfig)]
REPORT_TO = ("wandb", "tensorboard")
# Earlier names still read from flags and files: old name -> (field, {old value: new value}).
ALIASES = {"fsdp": ("dist", {"on": "fsdp", "off": "none", "auto": "auto"})}


def _section_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """field name -> (section, dataclass field)."""
    out = {}
    for sec in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(sec.default_factory()):  # type: ignore[misc]
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (sec.name, f)
    return out


FIELDS = _section_fields()


def _base_type(tp: Any) -> type:
    """`int | None` -> int; `str` -> str."""
    if isinstance(tp, str):
        tp = eval(tp, {"__builtins__": __builtins__})  # annotations are strings (PEP 563)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _coerce(name: str, value: Any) -> Any:
    section, f = FIELDS[name]
    tp = _base_type(f.type)
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
                    raise ValueError(value)
                return low in {"true", "1", "yes", "on"}
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if tp is str and isinstance(value, bool) and "on" in (f.metadata["choices"] or ()):
            return "on" if value else "off"  # YAML reads a bare on/off as a boolean
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; unset flags stay None so that files and defaults apply."""
    parser.add_argument("--config", help="YAML config file (flat or sectioned keys)")
    groups = {sec: parser.add_argument_group(f"{sec} settings") for sec in SECTIONS}
    for name, (section, f) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        tp = _base_type(f.type)
        help_text = f.metadata["help"].replace("%", "%%")
        if f.default not in (None, "") and tp is not bool:
            help_text += f" (default: {f.default})"
        group = groups[section]
        if tp is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif name == "resume":  # a bare --resume means the latest checkpoint
            group.add_argument(
                flag,
                dest=name,
                nargs="?",
                const="latest",
                default=None,
                metavar="latest|DIR",
                help=help_text,
            )
        else:
            choices = f.metadata["choices"]
            group.add_argument(
                flag,
                dest=name,
                default=None,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else None,
                help=help_text,
            )
    for old, (name, values) in ALIASES.items():
        renamed = ", ".join(f"{a} = {b}" for a, b in values.items())
        groups[FIELDS[name][0]].add_argument(
            "--" + old, dest=old, default=None, choices=tuple(values), help=f"--{name}: {renamed}"
        )


def _flatten_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                sub = str(sub).replace("-", "_")
                owner = FIELDS[ALIASES[sub][0]][0] if sub in ALIASES else FIELDS.get(sub, ("",))[0]
                if owner != key:
                    raise ConfigError(f"{path}: unknown setting {key}.{sub}")
                flat[sub] = v
        elif key in FIELDS or key in ALIASES:
            flat[key] = value
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    return flat


def _unalias(values: dict[str, Any]) -> dict[str, Any]:
    """`fsdp: on` -> `dist: fsdp` (YAML reads a bare on/off as a boolean)."""
    out = dict(values)
    for old, (name, mapping) in ALIASES.items():
        if old not in out:
            continue
        value = out.pop(old)
        value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
        if value not in mapping:
            raise ConfigError(f"--{old}: {value!r} is not one of {sorted(mapping)}")
        if name in out and out[name] != mapping[value]:
            raise ConfigError(f"--{old} {value} and --{name} {out[name]} disagree: give --{name}")
        out[name] = mapping[value]
    return out


def from_flat(values: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    for name, value in _unalias(values).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        section, _ = FIELDS[name]
        setattr(getattr(cfg, section), name, _coerce(name, value))
    return cfg.validate()


def from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < --config file < flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_unalias(_flatten_file(args.config)))
    flags = {name: getattr(args, name, None) for name in [*FIELDS, *ALIASES]}
    values.update(_unalias({k: v for k, v in flags.items() if v is not None}))
    return from_flat(values)


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of RunConfig.to_dict (nested); used when resuming from a checkpoint."""
    flat = {k: v for sec in d.values() if isinstance(sec, dict) for k, v in sec.items()}
    return from_flat(flat)


def save(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def with_values(cfg: RunConfig, **values: Any) -> RunConfig:
    """A validated copy of `cfg` with some fields set (by flat name): how a build turns every
    "auto" into what it resolved to, without changing the config it was given."""
    out = copy.deepcopy(cfg)
    for name, value in values.items():
        section, _ = FIELDS[name]
        setattr(getattr(out, section), name, value)
    return out.validate()


def check_world_size(cfg: RunConfig, world_size: int) -> None:
    """The batch splits evenly over the ranks (and their micro-batches); several ranks share
    one model (replicated or sharded)."""
    if cfg.dist.dist == "none" and world_size > 1:
        raise ConfigError(
            f"--dist none: {world_size} ranks would train {world_size} separate models; use "
            "--dist auto, ddp or fsdp"
        )
    bs, mb = cfg.optim.batch_size, cfg.optim.micro_batch_size
    if bs % world_size:
        raise ConfigError(f"--batch-size {bs} is not a multiple of the world size {world_size}")
    if mb and (bs // world_size) % mb:
        raise ConfigError(
            f"--batch-size {bs} is not a multiple of --micro-batch-size {mb} x world size {world_size}"
        )


def _validate(cfg: RunConfig) -> None:
    for name, (section, f) in FIELDS.items():
        allowed = f.metadata["choices"]
        value = getattr(getattr(cfg, section), name)
        if allowed and value not in allowed:
            raise ConfigError(
                f"--{name.replace('_', '-')}: {value!r} is not one of {sorted(allowed)}"
            )
    positive = {
        "seq_length": cfg.data.seq_length,
        "batch_size": cfg.optim.batch_size,
        "log_every": cfg.log.log_every,
        "keep_checkpoints": cfg.checkpoint.keep_checkpoints,
    }
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    non_negative = {
        "micro_batch_size": cfg.optim.micro_batch_size,
        "max_steps": cfg.optim.max_steps,
        "eval_every": cfg.log.eval_every,
        "save_every": cfg.checkpoint.save_every,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "grad_clip": cfg.optim.grad_clip,
        "epochs": cfg.optim.epochs,
        "num_samples": cfg.log.num_samples,
        "eval_max_batches": cfg.log.eval_max_batches or 0,
        "lora_dropout": cfg.adapter.lora_dropout,
        "max_memory_gib": cfg.model.max_memory_gib,
        "eval_tasks_every": cfg.tasks.eval_tasks_every,
        "eval_limit": cfg.tasks.eval_limit,
        "task_batch_size": cfg.tasks.task_batch_size,
    }
    for name, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    bs, mb = cfg.optim.batch_size, cfg.optim.micro_batch_size
    if mb and bs % mb:
        raise ConfigError(f"--batch-size {bs} is not a multiple of --micro-batch-size {mb}")
    if cfg.optim.optimizer != "adamw" and cfg.optim.compile_step:
        raise ConfigError(
            f"--compile-step compiles torch's AdamW: not with --optimizer {cfg.optim.optimizer}"
        )
    if cfg.model.fp8 != "off" and (cfg.adapter.lora or cfg.adapter.qlora):
        raise ConfigError(
            "--fp8 is for full fine-tuning: it cannot be combined with --lora or --qlora"
        )
    if cfg.adapter.lora_r < 1 or cfg.adapter.lora_alpha <= 0:
        raise ConfigError("--lora-r must be >= 1 and --lora-alpha > 0")
    if cfg.optim.max_steps == 0 and cfg.optim.epochs <= 0:
        raise ConfigError("--epochs must be > 0 when --max-steps is 0")
    if not 0.0 < cfg.model.activation_memory_budget <= 1.0:
        raise ConfigError(
            f"--activation-memory-budget must be in (0, 1], got {cfg.model.activation_memory_budget}"
        )
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if cfg.data.response_only and cfg.data.train_on not in ("auto", "assistant"):
        raise ConfigError(
            f"--response-only means --train-on assistant, not --train-on {cfg.data.train_on}"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if cfg.dist.dist in ("ddp", "none") and (cfg.dist.cpu_offload or cfg.dist.reduce_fp32):
        flag = "--cpu-offload" if cfg.dist.cpu_offload else "--reduce-fp32"
        raise ConfigError(f"{flag} is an FSDP setting: use --dist fsdp (or auto) with it")
    for name in cfg.log.backends:
        if name not in REPORT_TO:
            raise ConfigError(f"--report-to: unknown backend {name!r} ({', '.join(REPORT_TO)})")
