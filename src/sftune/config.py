"""One typed config tree for a run.

Every field is a CLI flag (`--field-name`) and a key of a YAML config file (`--config run.yaml`),
either flat (`lr: 1e-4`) or under its section (`optim: {lr: 1e-4}`). Field names are unique
across sections so that a flat key is never ambiguous. Precedence: defaults < config file <
flags. The resolved config is saved as `config.yaml` in the run directory and in every
checkpoint. With `--resume` the base is that saved config instead, and the settings given
may change only what `RESUME_MAY_CHANGE` lists (`resume_settings`).

    sftune train --model smollm2-135m --train-data train.jsonl --lr 1e-4 --max-steps 100
    sftune train --config configs/demo.yaml --max-steps 10     # a flag overrides the file
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftune.errors import ConfigError, SftuneError
from sftune.files import atomic_write_text
from sftune.tasks import split_names


def _f(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field: its default, its help text and, for a string setting, the allowed values
    (validated once, in `validate`, and shown as the flag's choices in --help); for a number,
    its bounds (>= ge, > gt, <= le, < lt; validated once too, and shown in --help). A float must
    also be finite: no setting takes NaN or an infinity."""
    bounds = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt}.items() if v is not None}
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


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
        gt=0,
        le=1,
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
        ge=0,
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
    # issue 26: rope scaling
    rope_scaling: str | None = _f(
        None,
        "extend the model's context: linear:FACTOR, yarn:FACTOR or llama3:FACTOR (FACTOR > 1) "
        "sets that rope scaling and multiplies max_position_embeddings by FACTOR; saved in "
        "final/'s config.json. A model scaled already (Llama 3.1: llama3, 8x from 8192) takes "
        "the same type only, and its factor is multiplied",
    )
    # issue 26: tiled MLP
    tiled_mlp: str = _f(
        "off",
        "compute each decoder layer's MLP over the sequence in tiles, forward and backward, so "
        "its wide intermediate is never whole (long sequences; without activation checkpointing "
        "the MLP's forward runs once more): on, off, auto (left to the memory planner; off until "
        "it decides)",
        ("off", "on", "auto"),
    )
    tiled_mlp_chunk: int = _f(0, "tokens per MLP tile; 0: a default from the model's sizes", ge=0)
    # issue 26: offload
    activation_offload: str = _f(
        "off",
        "checkpoint every decoder layer and keep its input hidden states in pinned CPU memory "
        "(copied out and back on a side stream, overlapped with compute) instead of on the GPU: "
        "on, off, auto (on where the run would not fit without it: resolved by the planner)",
        ("off", "on", "auto"),
    )
    activation_offload_keep: int = _f(
        0,
        "with activation offload: the last N decoder layers keep their inputs on the GPU "
        "(fewer copies, less host memory: each layer's input is micro-batch x seq x hidden); "
        "the others are offloaded. With --activation-offload auto the planner chooses it",
        ge=0,
    )


@dataclass
class DataConfig:
    train_data: str | None = _f(
        None, "training JSON Lines file (.jsonl / .jsonl.gz); default: the embedded demo set"
    )
    val_data: str | None = _f(
        None, "validation file; default: hold out --val-fraction of the training documents"
    )
    val_fraction: float = _f(
        0.05,
        "fraction of training documents held out when there is no --val-data",
        ge=0,
        lt=1,
    )
    fields: str | None = _f(
        None,
        "the file's keys as sftune's fields (prompt, response, messages), FILE_KEY=FIELD, "
        "comma-separated: e.g. 'question=prompt,answer=response' (GSM8K)",
    )
    seq_length: int = _f(512, "tokens per packed sequence", ge=1)
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
    chat_template: str | None = _f(
        None,
        "the chat template for chat records, set on the tokenizer and saved with final/'s: a "
        "name (chatml, llama3: both render tools and tool calls) or a Jinja file; default: the "
        "tokenizer's own",
    )
    packing: str = _f(
        "split",
        "split (the course rule: documents back to back, a row boundary may cut one), whole "
        "(a document that does not fit in the rest of a row starts the next one; the rest is "
        "padding, never trained)",
        ("split", "whole"),
    )
    overlong: str = _f(
        "refuse",
        "with --packing whole, a document too long for one row (more than --seq-length tokens "
        "before its final EOS): refuse (stop, naming its file and line), truncate (keep its "
        "start, drop the rest)",
        ("refuse", "truncate"),
    )
    # Preference pairs (sftune.data.pair_dataset), beside --objective's section.
    single_turn: bool = _f(
        False,
        "preference pairs in Anthropic HH's raw form: keep only single-turn conversations (one "
        "Human turn), as the course does; the others are counted, skipped and reported",
    )
    truncation: str = _f(
        "refuse",
        "preference pairs longer than --seq-length: refuse (stop, naming the pair's file and "
        "line), keep-start (keep the prompt, cut the responses' tails), keep-end (cut the "
        "prompt's head first)",
        ("refuse", "keep-start", "keep-end"),
    )


# The 8-bit --optimizer choices and the package each needs (its pip extra is the choice's name).
EIGHT_BIT_OPTIMIZERS = {"adamw8bit": "torchao", "adamw8bit-bnb": "bitsandbytes"}


@dataclass
class OptimConfig:
    batch_size: int = _f(32, "sequences per optimizer step (all ranks together)", ge=1)
    micro_batch_size: int = _f(
        0,
        "sequences per forward pass per rank; 0: largest that fits (GPU) or up to 8 (CPU)",
        ge=0,
    )
    epochs: float = _f(1.0, "passes over the training set (ignored when --max-steps > 0)", ge=0)
    max_steps: int = _f(0, "optimizer steps; 0: from --epochs", ge=0)
    # lr 0 trains nothing but is a valid baseline run; above 1e3 it is a typo (2e5 for 2e-5).
    lr: float = _f(2e-5, "peak learning rate", ge=0, le=1000)
    min_lr_ratio: float = _f(0.0, "cosine decay ends at min_lr_ratio * lr", ge=0, le=1)
    warmup_ratio: float = _f(0.03, "fraction of the steps with linear warmup", ge=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.999, "AdamW beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)", ge=0)
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
    seed: int = _f(0, "seed for data order, held-out split and initialisation", ge=0, le=2**63 - 1)


@dataclass
class LossConfig:
    objective: str = _f(
        "sft",
        "what is trained: sft (token-weighted cross-entropy on prompt/response or chat "
        "records); on preference pairs (prompt, chosen, rejected): dpo (sigmoid loss on summed "
        "log-probs against a reference), ipo (squared loss on per-token log-probs), simpo "
        "(reference-free, length-normalized, margin --simpo-gamma), orpo (reference-free odds "
        "ratio plus the chosen response's NLL)",
        ("sft", "dpo", "ipo", "simpo", "orpo"),
    )
    beta: float = _f(
        0.1,
        "preference objectives: the temperature beta (dpo, ipo, simpo), ORPO's lambda",
        gt=0,
        le=1000,
    )
    simpo_gamma: float = _f(0.5, "simpo: the target reward margin gamma", ge=0, le=1000)
    nll_weight: float = _f(
        0.0,
        "dpo, ipo, simpo: add this times the chosen responses' token-weighted NLL (RPO; "
        "TRL's rpo_alpha); 0: off",
        ge=0,
        le=1000,
    )
    ref_model: str | None = _f(
        None,
        "dpo, ipo: the reference model (a local directory or a preset with the same "
        "tokenizer); default: the starting --model (with --lora: it without the adapters). Its "
        "log-probs are computed once before training and cached with the packed pairs",
    )


@dataclass
class LogConfig:
    output_dir: str | None = _f(None, "run directory; default runs/<timestamp>")
    log_every: int = _f(10, "optimizer steps between train-loss log lines", ge=1)
    eval_every: int = _f(
        0, "optimizer steps between validation passes (0: only at start and end)", ge=0
    )
    eval_max_sequences: int | None = _f(
        None,
        "validation sequences per pass: the first K of the validation set, the same ones "
        "whatever the micro-batch size and the number of ranks; unset: all on a GPU, 64 on a "
        "CPU; 0: all",
        ge=0,
    )
    num_samples: int = _f(2, "generations from validation prompts at each evaluation", ge=0)
    max_new_tokens: int = _f(64, "tokens generated per sample", ge=1)
    report_to: str = _f("", "comma-separated: wandb, tensorboard")
    run_name: str | None = _f(None, "name for wandb / tensorboard")
    verbose: bool = _f(False, "show the libraries' own progress bars and warnings too")
    # issue 26: planner
    plan_only: bool = _f(
        False,
        "build the run (model, data, the memory plan: micro-batch, checkpointing, offload, "
        "tiled MLP), print the plan and the resolved config, and exit without training or "
        "writing anything to the run directory",
    )

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
        ge=0,
    )
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep", ge=1)
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
    lora_r: int = _f(16, "adapter rank", ge=1)
    lora_alpha: float = _f(32.0, "adapter scale numerator: the update is B A * alpha / r", gt=0)
    lora_dropout: float = _f(0.0, "dropout on the adapters' input", ge=0, lt=1)
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
        0,
        "optimizer steps between task evaluations (0: only at the start and the end)",
        ge=0,
    )
    eval_limit: int = _f(
        0,
        "problems per task and evaluation: the first K of its data, the same every time; 0: all",
        ge=0,
    )
    task_data: str | None = _f(
        None,
        "local data of the tasks, comma-separated TASK=FILE pairs, e.g. gsm8k=test.jsonl (JSON "
        "Lines of question/answer records)",
    )
    task_dir: str | None = _f(None, "a folder of lm-eval task YAMLs to add to sftune's own (gsm8k)")
    task_batch_size: int = _f(
        0,
        "prompts per generation batch in task evaluation; 0: 8 on a CPU, 64 on a GPU",
        ge=0,
    )
    task_prompt_format: str = _f(
        "auto",
        "how task prompts are rendered: alpaca (sftune's Alpaca template), chat (the "
        "tokenizer's chat template, with --system-prompt); auto: as the run trains (chat for "
        "chat records, else alpaca)",
        ("auto", "alpaca", "chat"),
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
    loss: LossConfig = field(default_factory=LossConfig)
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
# Settings that changed meaning, refused by their old name (a number of micro-batches cannot
# be turned into one of sequences): old name -> the message. A saved config.yaml (a run being
# resumed or exported) that still holds one is read without it: the run's new default applies.
RENAMED = {
    "eval_max_batches": "--eval-max-batches is now --eval-max-sequences: it counts validation "
    "sequences, the same whatever the micro-batch size and the number of ranks"
}


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
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML's yes/no/on/off are booleans, not 1 and 0
        if tp is str and isinstance(value, bool) and "on" in (f.metadata["choices"] or ()):
            return "on" if value else "off"  # YAML reads a bare on/off as a boolean
        if tp is str and not isinstance(value, (str, int, float)):
            # str() of a YAML list or mapping is no setting: `output_dir: [a, b]` would name
            # a directory "['a', 'b']".
            raise TypeError(value)
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; unset flags stay None so that files and defaults apply."""
    parser.add_argument("--config", help="YAML config file (flat or sectioned keys)")
    groups = {sec: parser.add_argument_group(f"{sec} settings") for sec in SECTIONS}
    for name, (section, f) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        tp = _base_type(f.type)
        help_text = f.metadata["help"].replace("%", "%%")
        notes = [f"default: {f.default}"] if f.default not in (None, "") and tp is not bool else []
        if f.metadata["bounds"]:
            notes.append(_describe_bounds(f.metadata["bounds"]))
        if notes:
            help_text += f" ({'; '.join(notes)})"
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
    for old in RENAMED:
        parser.add_argument("--" + old.replace("_", "-"), dest=old, help=argparse.SUPPRESS)
    for old, (name, values) in ALIASES.items():
        renamed = ", ".join(f"{a} = {b}" for a, b in values.items())
        groups[FIELDS[name][0]].add_argument(
            "--" + old, dest=old, default=None, choices=tuple(values), help=f"--{name}: {renamed}"
        )


def _read_yaml(path: str) -> Any:
    """A config file's YAML; one line naming the file (and the line) where it is unreadable, not
    UTF-8 text, not YAML, or nested too deeply to parse."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        reason = getattr(e, "problem", None) or " ".join(str(e).split())  # one line
        raise ConfigError(f"{where}: invalid YAML ({reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid config file (nested too deeply)") from None


def _check_file_value(path: str, name: str, value: Any) -> None:
    """A value of a config file is checked where it is read, so that its error names the file."""
    try:
        value = _coerce(name, value)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check_field(name, value, f"{path}: {name}")


def _flatten_file(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = _read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in RENAMED:
            raise ConfigError(f"{path}: {RENAMED[key]}")
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{path}: {key}: expected a mapping of {key} settings")
        if key in SECTIONS:
            for sub, v in value.items():
                sub = str(sub).replace("-", "_")
                if sub in RENAMED:
                    raise ConfigError(f"{path}: {RENAMED[sub]}")
                owner = FIELDS[ALIASES[sub][0]][0] if sub in ALIASES else FIELDS.get(sub, ("",))[0]
                if owner != key:
                    raise ConfigError(f"{path}: unknown setting {key}.{sub}")
                flat[sub] = v
        elif key in FIELDS or key in ALIASES:
            flat[key] = value
        else:
            raise ConfigError(f"{path}: unknown setting {key!r}")
    for name, value in flat.items():
        if name in FIELDS:  # aliases are checked once renamed
            _check_file_value(path, name, value)
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


def given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the user gave, flat: the --config file's keys, then the flags set."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_unalias(_flatten_file(args.config)))
    for old, message in RENAMED.items():
        if getattr(args, old, None) is not None:
            raise ConfigError(message)
    flags = {name: getattr(args, name, None) for name in [*FIELDS, *ALIASES]}
    values.update(_unalias({k: v for k, v in flags.items() if v is not None}))
    return values


def from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < --config file < flags."""
    return from_flat(given_values(args))


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of RunConfig.to_dict (nested); used when resuming from a checkpoint."""
    flat = {k: v for sec in d.values() if isinstance(sec, dict) for k, v in sec.items()}
    return from_flat({k: v for k, v in flat.items() if k not in RENAMED})


def save(cfg: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load(path: Path) -> RunConfig:
    """A run's saved config.yaml (what `save` wrote), validated; one line naming the file when
    it cannot be read or is not a valid sftune config."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SftuneError(f"{path}: cannot read the saved run's config ({e})") from None
    if not isinstance(saved, dict):
        raise SftuneError(f"{path}: not a sftune run config")
    try:
        return from_dict(saved)
    except ConfigError as e:
        raise SftuneError(f"{path}: the saved run's config is invalid ({e})") from None


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


# The bounds of `_f` as predicates and as they read in a message.
_BOUNDS = {
    "ge": (operator.ge, ">="),
    "gt": (operator.gt, ">"),
    "le": (operator.le, "<="),
    "lt": (operator.lt, "<"),
}


def _describe_bounds(bounds: dict[str, float]) -> str:
    """{"ge": 0, "lt": 1} -> "in [0, 1)"; {"gt": 0} -> "> 0"."""
    low = [(k, v) for k, v in bounds.items() if k in ("ge", "gt")]
    high = [(k, v) for k, v in bounds.items() if k in ("le", "lt")]
    if low and high:
        (lk, lv), (hk, hv) = low[0], high[0]
        return f"in {'[' if lk == 'ge' else '('}{lv}, {hv}{']' if hk == 'le' else ')'}"
    k, v = (low or high)[0]
    return f"{_BOUNDS[k][1]} {v}"


def _check_field(name: str, value: Any, setting: str | None = None) -> None:
    """One field's value against its choices, or its bounds and (a float) finiteness; the
    message names `setting` (default: the field's flag)."""
    _, f = FIELDS[name]
    setting = setting or "--" + name.replace("_", "-")
    allowed = f.metadata["choices"]
    if allowed and value not in allowed:
        raise ConfigError(f"{setting}: {value!r} is not one of {sorted(allowed)}")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{setting} must be a finite number, got {value}")
    bounds = f.metadata["bounds"]
    if not all(_BOUNDS[k][0](value, bound) for k, bound in bounds.items()):
        raise ConfigError(f"{setting} must be {_describe_bounds(bounds)}, got {value}")


ROPE_SCALING_TYPES = ("linear", "yarn", "llama3")


def parse_rope_scaling(value: str) -> tuple[str, float]:
    """`--rope-scaling TYPE:FACTOR` as (type, factor); one line naming the setting otherwise.

    >>> parse_rope_scaling("yarn:4")
    ('yarn', 4.0)
    """
    kind, _, factor = value.partition(":")
    try:
        number = float(factor)
    except ValueError:
        number = math.nan
    if kind not in ROPE_SCALING_TYPES or not (math.isfinite(number) and number > 1):
        raise ConfigError(
            f"--rope-scaling {value}: expected TYPE:FACTOR with TYPE one of "
            f"{', '.join(ROPE_SCALING_TYPES)} and FACTOR > 1 (yarn:4: 4x the model's positions)"
        )
    return kind, number


# Longest window for which a document mask may be a dense (T, T) tensor. transformers 5 builds
# one for sdpa and eager from packed position_ids (masking_utils.sdpa_mask): 1 GiB per sequence
# at 32K, 3 GiB at the peak of its build (benchmarks/long_data.py --parts mask), 256 GiB at
# 512K. flex_attention's BlockMask is built by blocks and flash_attention_2 takes no mask.
DENSE_DOC_MASK_MAX = 32768


def _check_dense_doc_mask(cfg: RunConfig) -> None:
    """issue 26: refuse a document mask that would be a dense T x T tensor past 32K tokens."""
    length, attn = cfg.data.seq_length, cfg.model.attn
    if cfg.data.doc_mask == "on" and attn in ("sdpa", "eager") and length > DENSE_DOC_MASK_MAX:
        dense = length * length * (1 if attn == "sdpa" else 4) / 2**30
        raise ConfigError(
            f"--doc-mask on with --attn {attn} at --seq-length {length}: transformers builds a "
            f"dense {length} x {length} document mask per sequence ({dense:,.0f} GiB); use "
            "--attn flex_attention (a mask by blocks) or flash_attention_2 (none), or --doc-mask "
            f"off, or --seq-length {DENSE_DOC_MASK_MAX} or less"
        )


def _validate(cfg: RunConfig) -> None:
    for name, (section, _) in FIELDS.items():
        _check_field(name, getattr(getattr(cfg, section), name))
    if cfg.model.rope_scaling is not None:  # issue 26
        parse_rope_scaling(cfg.model.rope_scaling)
    _check_dense_doc_mask(cfg)
    # What no single field's bounds can say.
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
    if cfg.optim.max_steps == 0 and cfg.optim.epochs <= 0:
        raise ConfigError("--epochs must be > 0 when --max-steps is 0")
    if cfg.data.response_only and cfg.data.train_on not in ("auto", "assistant"):
        raise ConfigError(
            f"--response-only means --train-on assistant, not --train-on {cfg.data.train_on}"
        )
    if cfg.dist.dist in ("ddp", "none") and (cfg.dist.cpu_offload or cfg.dist.reduce_fp32):
        flag = "--cpu-offload" if cfg.dist.cpu_offload else "--reduce-fp32"
        raise ConfigError(f"{flag} is an FSDP setting: use --dist fsdp (or auto) with it")
    _validate_objective(cfg)
    for name in cfg.log.backends:
        if name not in REPORT_TO:
            raise ConfigError(f"--report-to: unknown backend {name!r} ({', '.join(REPORT_TO)})")


def _validate_objective(cfg: RunConfig) -> None:
    """The preference settings that only some objectives read."""
    objective = cfg.loss.objective
    if cfg.loss.ref_model and objective not in ("dpo", "ipo"):
        raise ConfigError(
            f"--ref-model: --objective {objective} "
            + ("trains on cross-entropy alone" if objective == "sft" else "is reference-free")
        )
    if cfg.loss.nll_weight and objective in ("sft", "orpo"):
        raise ConfigError(
            f"--nll-weight: --objective {objective} "
            + ("is the NLL already" if objective == "sft" else "carries the chosen NLL (weight 1)")
        )
    if objective != "sft" and (cfg.data.packing != "split" or cfg.data.response_only):
        flag = "--response-only" if cfg.data.response_only else f"--packing {cfg.data.packing}"
        raise ConfigError(
            f"{flag}: an SFT setting; --objective {objective} packs whole pairs and scores the "
            "responses"
        )


# ----------------------------------------------------------------------------- resume policy

# What `--resume` may change in the run it continues: how long it runs, how it logs, evaluates
# and saves, and how the same computation is laid out (ranks, sharding, micro-batches with
# accumulation, kernels, compilation: the step's gradient does not depend on them, which the
# accumulation and 2-rank tests prove). Every other setting decides what is trained (model,
# adapters, data and its rendering, optimizer and schedule, dtype, seed): changing one on
# resume would train something else under the saved run's name, so it is refused.
RESUME_MAY_CHANGE = frozenset(
    {
        # length
        "max_steps",
        "epochs",
        # logging and evaluation
        "log_every",
        "eval_every",
        "eval_max_sequences",
        "num_samples",
        "max_new_tokens",
        "report_to",
        "run_name",
        "verbose",
        "plan_only",  # issue 26: planner (a dry run of the resumed run)
        "eval_tasks",
        "eval_tasks_every",
        "eval_limit",
        "task_data",
        "task_dir",
        "task_batch_size",
        "task_prompt_format",
        # checkpoints and the run directory
        "save_every",
        "keep_checkpoints",
        "save_final",
        "resume",
        "output_dir",
        # layout: the same step computed another way
        "micro_batch_size",
        "activation_checkpointing",
        "activation_offload",  # issue 26: offload
        "activation_offload_keep",  # issue 26: offload (where the inputs wait, not a number)
        "activation_memory_budget",
        "max_memory_gib",
        "compile",
        "compile_mode",
        "compile_step",
        "attn",
        "sdpa_backend",
        "fused_loss",
        "device",
        "dist",
        "reshard_after_forward",
        "reduce_fp32",
        "cpu_offload",
    }
)
# Settings whose default (auto, 0, unset) the build resolves and saves as what it became
# (config.yaml says `dtype: fp32` where the user said auto). Given at that default on resume
# (a config file that says `dtype: auto`), one means "as resolved before" and keeps the saved
# value: a resumed run never re-resolves into something else on other hardware.
RESOLVED_BY_BUILD = frozenset(
    {
        "train_data",
        "val_data",
        "dtype",
        "attn",
        "compile",
        "fused_loss",
        "doc_mask",
        "device",
        "dist",
        "reshard_after_forward",
        "micro_batch_size",
        "activation_checkpointing",
        "eval_max_sequences",
        "task_batch_size",
        "task_prompt_format",
        "train_on",
        "response_only",
        "output_dir",
    }
)
# A short form of the rule, for the refusal.
RESUME_RULE = (
    "a resumed run keeps its settings (only steps, epochs, logging, evaluation and save "
    "cadence, and how the step is laid out, may change)"
)


def flat_values(cfg: RunConfig) -> dict[str, Any]:
    """Every setting of `cfg` by its flat name."""
    return {name: getattr(getattr(cfg, section), name) for name, (section, _) in FIELDS.items()}


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "unset" if value is None else str(value)


def resume_settings(saved: RunConfig, given: dict[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    """The saved run's resolved config with the given settings that may change applied:
    (config, {setting: the saved value it replaced}). A given setting equal to the saved one
    (or, for one the build resolves, at its "auto" default) is no change; any other change
    outside RESUME_MAY_CHANGE is a ConfigError naming it, the saved and the given value.

        --lr 0.01: the run being resumed was trained with 0.001; a resumed run keeps ...
    """
    before = flat_values(saved)
    changes: dict[str, Any] = {}
    for name, raw in _unalias(given).items():
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        value = _coerce(name, raw)
        default = FIELDS[name][1].default
        if value == before[name] or (name in RESOLVED_BY_BUILD and value == default):
            continue
        if name not in RESUME_MAY_CHANGE:
            raise ConfigError(
                f"--{name.replace('_', '-')} {show_value(value)}: the run being resumed was trained "
                f"with {show_value(before[name])}; {RESUME_RULE}"
            )
        changes[name] = value
    cfg = with_values(saved, **changes)
    return cfg, {name: before[name] for name in changes}
