"""The `sftune` command line: parse, check the input cheaply, then call into the package.

    sftune train    --config configs/demo.yaml           # fine-tune (sftune.train.loop)
    sftune eval     --model DIR --data FILE              # token-weighted loss and perplexity
    sftune generate --model DIR --prompt "..."           # a response, stopping where it ends
    sftune generate --model DIR --messages chat.json     # a conversation's next assistant turn
    sftune generate --model DIR                          # an interactive chat (on a terminal)
    sftune generate --model DIR --data FILE --num-samples K --temperature 0.7 --out S.jsonl
                                                         # K answers per record (sftune.sampling)
    sftune prepare  DATA --tokenizer TOK --seq-length N  # build and cache a packed dataset
    sftune eval     --model DIR --tasks gsm8k --task-data gsm8k=test.jsonl   # lm-eval accuracy
    sftune export   RUN/checkpoints/step_N --out DIR     # a checkpoint as a model directory
    sftune prepare  chats.jsonl --tokenizer TOK --seq-length N --show 2   # ... and see the masks

Flags, model names and the first record of every data file are checked before torch or
transformers are imported, so a typo costs a second, not a model load. Every user-facing error
is one line on stderr and exit status 2; an interrupt is exit status 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

# Before torch touches CUDA: segments that grow instead of fragmenting let the largest
# micro-batch fit near the memory limit (as torchtitan sets it). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from sftune import config as config_mod  # noqa: E402 (standard library + yaml only)
from sftune import presets  # noqa: E402
from sftune.data.formats import data_file, parse_fields, peek  # noqa: E402
from sftune.errors import SftuneError  # noqa: E402

# module -> what to pip install; checked before the run starts instead of failing mid-run.
REQUIRED = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "accelerate": "accelerate",
}
DTYPES = config_mod.FIELDS["dtype"][1].metadata["choices"]
DEVICES = config_mod.FIELDS["device"][1].metadata["choices"]
TRAIN_ON = config_mod.FIELDS["train_on"][1]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (through main) instead of usage + exit: main
    prints `sftune: error: `, then the subcommand (if any) and argparse's message."""

    def error(self, message: str):
        command = self.prog.removeprefix("sftune").strip()
        raise SftuneError(f"{command}: {message}" if command else message)


def check_dependencies() -> None:
    """sftune's own dependencies importable (each missing one named with its pip name)."""
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SftuneError(f"missing dependencies: pip install {' '.join(missing)}")


def check_environment(model: str, fp8: str = "off", optimizer: str = "adamw") -> None:
    """Every dependency importable (torchao too for --fp8 and --optimizer adamw8bit,
    bitsandbytes for adamw8bit-bnb), and the model a preset or a directory."""
    check_dependencies()
    if fp8 != "off" and importlib.util.find_spec("torchao") is None:
        raise SftuneError("--fp8 needs torchao: pip install 'sftune[fp8]'")
    package = config_mod.EIGHT_BIT_OPTIMIZERS.get(optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise SftuneError(
            f"--optimizer {optimizer} needs {package}: pip install 'sftune[{optimizer}]'"
        )
    presets.check_model(model)
    converted = (presets.preset_cache_dir(model) / "config.json").is_file()
    if model in presets.PRESETS and not converted and importlib.util.find_spec("gguf") is None:
        raise SftuneError(f"preset {model!r} is converted from GGUF, which needs: pip install gguf")


def check_data(fields: str | None, *paths: str | None, objective: str = "sft") -> None:
    """The first record of each data file reads as a known format of the objective's data:
    SFT records, or preference pairs for dpo/ipo/simpo/orpo (one line naming the file, line
    and field otherwise, and the objective the file is for)."""
    from sftune.data import preference

    if objective != "sft":
        mapping = preference.parse_pair_fields(fields)
        for path in filter(None, paths):
            preference.require_pairs(path, mapping, objective)
        return
    mapping = parse_fields(fields)
    for path in filter(None, paths):
        preference.check_not_pairs(path)
        peek(path, mapping)


def check_tasks(names, task_data: str | None, task_dir: str | None):
    """lm-eval tasks that exist, with local data that reads, and lm-eval installed; then every
    hub lookup is switched off (before anything imports the hub)."""
    from sftune import tasks

    specs = tasks.resolve_tasks(names, task_data, task_dir)
    tasks.check_installed()
    tasks.go_offline()
    return specs


# ----------------------------------------------------------------------------- train


def add_train(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    given = config_mod.given_values(args)
    if given.get("resume"):  # the saved run's settings; the given ones may change only some
        from sftune.train.rundir import plan_resume

        # Sizes only: the build verifies every file's hash once, on rank 0.
        cfg = plan_resume(given, verify_contents=False).cfg
    else:
        cfg = config_mod.from_flat(given)
    check_environment(cfg.model.model, cfg.model.fp8, cfg.optim.optimizer)
    presets.check_seq_length(cfg.data.seq_length, cfg.model.model, cfg.model.rope_scaling)
    check_data(
        cfg.data.fields, cfg.data.train_data, cfg.data.val_data, objective=cfg.loss.objective
    )
    if cfg.tasks.names:
        check_tasks(cfg.tasks.names, cfg.tasks.task_data, cfg.tasks.task_dir)
    if cfg.log.plan_only:  # issue 26: the plan and the resolved config, nothing trained
        from sftune.train.build import plan_only

        return plan_only(cfg)
    from sftune.train.loop import train

    return 130 if train(cfg).interrupted else 0


# ----------------------------------------------------------------------------- eval


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a model directory (e.g. runs/X/final) or a preset"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights' dtype (default: auto)"
    )
    parser.add_argument("--device", default="auto", choices=DEVICES, help="default: auto")


def add_eval(parser: argparse.ArgumentParser) -> None:
    _model_flags(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="loss and perplexity on JSON Lines records (as for training)")
    what.add_argument(
        "--tasks", help="lm-eval tasks, comma-separated, e.g. gsm8k (pip install 'sftune[eval]')"
    )
    loss = parser.add_argument_group("loss and perplexity (--data)")
    loss.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="tokens per packed sequence (default: the length the model was tuned at, which "
        "sftune.json records; else 512)",
    )
    loss.add_argument("--fields", help="field mapping, e.g. question=prompt,answer=response")
    _train_on_flags(loss, "scored")
    loss.add_argument(
        "--max-sequences",
        type=int,
        default=0,
        help="score only the first N packed sequences (default: all)",
    )
    loss.add_argument("--max-batches", help=argparse.SUPPRESS)  # refused: see run_eval
    pairs = parser.add_argument_group(
        "preference pairs (--data of prompt/chosen/rejected records: the objective's held-out "
        "loss, reward accuracy and margin)"
    )
    pairs.add_argument(
        "--objective",
        choices=("dpo", "ipo", "simpo", "orpo"),
        help="default: the one the model was tuned with (sftune.json), else dpo",
    )
    pairs.add_argument("--beta", type=float, help="default: the tuned run's, else 0.1")
    pairs.add_argument(
        "--ref-model", help="the reference (dpo, ipo); default: the model the run started from"
    )
    pairs.add_argument(
        "--truncation",
        default="refuse",
        choices=("refuse", "keep-start", "keep-end"),
        help="a pair longer than --seq-length: refuse (default), or cut as in training",
    )
    tasks = parser.add_argument_group("task accuracy (--tasks, through lm-evaluation-harness)")
    tasks.add_argument(
        "--task-data",
        help="TASK=FILE pairs, comma-separated: e.g. gsm8k=test.jsonl (question/answer)",
    )
    tasks.add_argument("--task-dir", help="a folder of lm-eval task YAMLs to add to sftune's own")
    tasks.add_argument(
        "--limit", type=int, default=0, help="the first K problems of each task (default: all)"
    )
    tasks.add_argument(
        "--max-gen-toks", type=int, default=0, help="cap on generated tokens (default: the task's)"
    )
    tasks.add_argument(
        "--output-dir", help="where eval_results.json goes (default: the model directory)"
    )
    tasks.add_argument(
        "--prompt-format",
        default="auto",
        choices=("auto", "alpaca", "chat"),
        help="how task prompts are rendered: alpaca (sftune's Alpaca template), chat (the "
        "tokenizer's chat template); auto (default): the format the model was tuned with, "
        "which its sftune.json records",
    )
    tasks.add_argument(
        "--log-samples", action="store_true", help="also write each task's prompts and outputs"
    )
    tasks.add_argument("--verbose", action="store_true", help="show lm-eval's own log lines")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="sequences per forward (default: 8; with --tasks, prompts per generation batch: "
        "8 on a CPU, 64 on a GPU)",
    )
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 0:
        raise SftuneError(f"--batch-size must be >= 0 (0: the default), got {args.batch_size}")
    check_environment(args.model)
    if args.tasks:
        return run_task_eval(args)
    if args.max_batches is not None:
        raise SftuneError(
            "--max-batches is now --max-sequences: it counts packed sequences, the same whatever "
            "the --batch-size"
        )
    if args.max_sequences < 0 or (args.seq_length is not None and args.seq_length < 1):
        raise SftuneError("--max-sequences must be >= 0 and --seq-length >= 1")
    from sftune.data.preference import looks_like_pairs

    if looks_like_pairs(args.data) is not None:
        return run_pair_eval(args)
    check_data(args.fields, args.data)
    from sftune.train.evaluate import evaluate_file
    from sftune.train.generate import tuned_settings

    seq_length, why = eval_seq_length(args.seq_length, tuned_settings(args.model))
    loss, count = evaluate_file(
        args.model,
        args.data,
        seq_length=seq_length,
        batch_size=args.batch_size or 8,
        fields=parse_fields(args.fields),
        train_on=args.train_on,
        response_only=args.response_only,
        dtype=args.dtype,
        device=args.device,
        max_sequences=args.max_sequences,
    )
    import math

    print(
        f"loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.3f} | {count} tokens | "
        f"seq-length {seq_length} ({why}) | {args.data}"
    )
    return 0


def run_pair_eval(args: argparse.Namespace) -> int:
    """`sftune eval --data pairs.jsonl`: the preference objective's validation row, with the
    objective, beta and reference the model was tuned with (sftune.json) unless given."""
    from sftune.data.preference import parse_pair_fields
    from sftune.train.evaluate import evaluate_pairs_file
    from sftune.train.generate import tuned_settings

    meta, _ = tuned = tuned_settings(args.model)
    tuned_objective = meta.get("objective") if meta.get("objective") != "sft" else None
    objective = args.objective or tuned_objective or "dpo"
    pref = meta.get("preference") if isinstance(meta.get("preference"), dict) else {}
    ref_model = args.ref_model or pref.get("ref_model")
    beta = args.beta if args.beta is not None else pref.get("beta", 0.1)
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1000):
        raise SftuneError(f"--beta must be in (0, 1000], got {beta}")
    check_data(args.fields, args.data, objective=objective)
    seq_length, why = eval_seq_length(args.seq_length, tuned)
    row, pairs = evaluate_pairs_file(
        args.model,
        args.data,
        objective=objective,
        ref_model=ref_model,
        beta=beta,
        simpo_gamma=pref.get("simpo_gamma", 0.5),
        nll_weight=pref.get("nll_weight", 0.0),
        seq_length=seq_length,
        batch_size=args.batch_size or 8,
        fields=parse_pair_fields(args.fields),
        truncation=args.truncation,
        dtype=args.dtype,
        device=args.device,
        max_sequences=args.max_sequences,
    )
    against = f"against {ref_model}" if ref_model and objective in ("dpo", "ipo") else ""
    print(
        f"val_loss {row['val_loss']:.4f} | reward accuracy {row['val_rewards/accuracies']:.4f} | "
        f"margin {row['val_rewards/margins']:.4f} | {pairs} pairs | {objective} (beta {beta:g}) "
        f"{against} | seq-length {seq_length} ({why}) | {args.data}"
    )
    return 0


def eval_seq_length(flag: int | None, tuned: tuple[dict, Path | None]) -> tuple[int, str]:
    """--seq-length, else the tuned run's (sftune.json), else 512; and why, to print."""
    meta, where = tuned
    if flag is not None:
        return flag, "--seq-length"
    if isinstance(meta.get("seq_length"), int):
        return meta["seq_length"], f"the model was tuned at it: {where}"
    return 512, "the default: the model records no tuned length"


def eval_output_dir(model: str, output_dir: str | None) -> Path:
    """--output-dir, else the model's own directory (the current one for a preset)."""
    if output_dir:
        return Path(output_dir)
    return Path(model).expanduser() if model not in presets.PRESETS else Path.cwd()


def run_task_eval(args: argparse.Namespace) -> int:
    """`sftune eval --tasks`: lm-eval's table on the console, eval_results.json on disk."""
    if args.limit < 0 or args.max_gen_toks < 0 or args.batch_size < 0:
        raise SftuneError("--limit, --max-gen-toks and --batch-size must be >= 0")
    specs = check_tasks(args.tasks, args.task_data, args.task_dir)
    out = eval_output_dir(args.model, args.output_dir)
    if out.exists() and not out.is_dir():
        raise SftuneError(f"--output-dir {out}: exists and is not a directory")
    from sftune.train.harness import evaluate_model

    evaluate_model(
        args.model,
        specs,
        out,
        limit=args.limit,
        batch_size=args.batch_size,
        max_gen_toks=args.max_gen_toks,
        dtype=args.dtype,
        device=args.device,
        prompt_format=args.prompt_format,
        log_samples=args.log_samples,
        verbose=args.verbose,
    )
    return 0


def _train_on_flags(parser: argparse.ArgumentParser, verb: str = "trained") -> None:
    """--train-on (the config's choices and help) and its old name --response-only."""
    parser.add_argument(
        "--train-on",
        default="auto",
        choices=TRAIN_ON.metadata["choices"],
        help=f"which labels are {verb}: " + TRAIN_ON.metadata["help"].split(": ", 1)[1],
    )
    parser.add_argument(
        "--response-only", action="store_true", help="the old name of --train-on assistant"
    )


# ----------------------------------------------------------------------------- generate


def add_generate(parser: argparse.ArgumentParser) -> None:
    _model_flags(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="the instruction or user message")
    what.add_argument(
        "--messages",
        metavar="FILE",
        help="a conversation as JSON (a list of messages, or {messages, tools}): the model "
        "writes its next assistant turn",
    )
    what.add_argument(
        "--data",
        metavar="FILE",
        help="answer every record's prompt (as sftune's SFT readers read it), writing --out",
    )
    parser.add_argument(
        "--system-prompt",
        help="a system message to open the chat with (default: the one the model was tuned "
        "with, if any)",
    )
    batch = parser.add_argument_group("batch sampling (--data)")
    batch.add_argument("--out", metavar="FILE", help="the samples file to write (JSON Lines, new)")
    batch.add_argument(
        "--num-samples", type=int, default=None, help="answers per prompt (default: 1)"
    )
    batch.add_argument(
        "--batch-size", type=int, default=None, help="rows generated together (default: 32)"
    )
    batch.add_argument(
        "--limit", type=int, default=None, help="only the first N records (default: all)"
    )
    batch.add_argument("--fields", help="field mapping, e.g. question=prompt,answer=response")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--prompt-format",
        "--format",  # its first name
        dest="format",
        default="auto",
        choices=("auto", "alpaca", "chat"),
        help="prompt rendering; auto: what sftune tuned the model with, else the tokenizer's chat "
        "template if it has one, else Alpaca",
    )
    parser.epilog = "Without --prompt or --messages, on a terminal: an interactive chat."
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SftuneError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.max_new_tokens < 1:
        raise SftuneError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.data is not None:
        return _run_sampling(args)
    given = [
        f
        for f in ("out", "num_samples", "batch_size", "limit", "fields")
        if getattr(args, f) is not None
    ]
    if given:
        raise SftuneError(f"generate: --{given[0].replace('_', '-')} needs --data FILE")
    interactive = args.prompt is None and args.messages is None
    if interactive and not sys.stdin.isatty():
        raise SftuneError(
            "generate: give --prompt or --messages FILE (the interactive chat needs a terminal)"
        )
    check_environment(args.model)
    from sftune.train.generate import chat_loop, read_messages

    # Checked before the model loads: a bad file costs a moment, not a model load.
    messages, tools = read_messages(args.messages) if args.messages else (None, None)
    if messages and args.system_prompt and messages[0]["role"] == "system":
        raise SftuneError(
            f"--system-prompt and {args.messages}'s own system message: give one of them"
        )
    gen = _generator(args, chat=messages is not None)
    if interactive:
        chat_loop(gen)
    elif messages is not None:
        print(gen.reply(messages, tools))
    else:
        print(gen.answer(args.prompt))
    return 0


def _generator(args: argparse.Namespace, chat: bool):
    """The model of `sftune generate`, loaded with the command's sampling and prompt flags
    (`chat`: the prompts are conversations, rendered with the chat template)."""
    from sftune.train.generate import load_generator

    return load_generator(
        args.model,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        fmt=args.format,
        system_prompt=args.system_prompt,
        chat=chat,
        dtype=args.dtype,
        device=args.device,
    )


def _run_sampling(args: argparse.Namespace) -> int:
    """`generate --data FILE --out samples.jsonl`: see sftune.sampling."""

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    k, batch, limit = given(args.num_samples, 1), given(args.batch_size, 32), given(args.limit, 0)
    if args.out is None:
        raise SftuneError("generate --data: give --out FILE, the samples file to write")
    for flag, value, low in (
        ("--num-samples", k, 1),
        ("--batch-size", batch, 1),
        ("--limit", limit, 0),
    ):
        if value < low:
            raise SftuneError(f"{flag} must be >= {low}, got {value}")
    if k > 1 and args.temperature == 0:
        raise SftuneError(
            f"--num-samples {k} with greedy decoding gives {k} copies of one answer: "
            "give --temperature > 0"
        )
    from sftune import sampling
    from sftune.data.formats import parse_fields

    out = sampling.check_out(args.out)
    # Checked before the model loads: a bad record costs a moment, not a model load.
    prompts = sampling.read_prompts(args.data, parse_fields(args.fields), limit)
    check_environment(args.model)
    gen = _generator(args, chat=any(p.is_chat for p in prompts))
    outputs = sampling.sample(gen, prompts, k, batch, sampling.print_progress)
    sampling.write_samples(out, args.data, prompts, outputs)
    print(
        f"sftune: generate: {len(prompts):,} prompts x {k} samples ({gen.fmt} prompts) "
        f"written to {out}",
        file=sys.stderr,
    )
    return 0


# ----------------------------------------------------------------------------- prepare


def add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="records: .jsonl, .jsonl.gz or .json (a list)")
    parser.add_argument(
        "--tokenizer", required=True, help="a tokenizer or model directory, or a preset"
    )
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per item")
    parser.add_argument("--shuffle", action="store_true", help="shuffle documents before packing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document shuffle")
    parser.add_argument("--fields", help="field mapping, e.g. question=prompt,answer=response")
    _train_on_flags(parser)
    parser.add_argument(
        "--system-prompt", help="a system message for every chat that has none (chats only)"
    )
    for name in ("chat_template", "packing", "overlong"):  # as `train` has them (DataConfig)
        setting = config_mod.FIELDS[name][1]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=setting.default,
            choices=setting.metadata["choices"],
            help=setting.metadata["help"],
        )
    parser.add_argument("--cache-dir", type=Path, help="default: <cache root>/packed")
    parser.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N packed documents with their trained tokens marked (green on a "
        "terminal, [[brackets]] otherwise)",
    )
    parser.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Build (or load from the cache) the packed dataset and print its statistics, so training
    with the same file, tokenizer, mapping and masking starts from the cache; with --show N,
    also its first N documents, trained tokens marked."""
    data_file(args.data)  # a directory, /dev/null or a FIFO is named as such
    if args.show < 0:
        raise SftuneError(f"--show must be >= 0, got {args.show}")
    check_data(args.fields, str(args.data))
    from sftune import models
    from sftune.data import PackedSFTDataset
    from sftune.data.chat_templates import read_chat_template, set_chat_template
    from sftune.data.show import show_documents

    template = read_chat_template(args.chat_template) if args.chat_template else None
    tokenizer = set_chat_template(
        models.load_tokenizer(args.tokenizer), args.chat_template, template
    )
    dataset = PackedSFTDataset(
        tokenizer,
        args.data,
        args.seq_length,
        args.shuffle,
        seed=args.seed,
        fields=parse_fields(args.fields),
        train_on=args.train_on,
        response_only=args.response_only,
        system_prompt=args.system_prompt,
        packing=args.packing,
        overlong=args.overlong,
        cache_dir=args.cache_dir,
        verbose=True,
    )
    stats = dataset.stats
    print(f"trained tokens: {stats.trained_tokens:,} of {stats.items * stats.seq_length:,}")
    if args.show:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(show_documents(dataset, tokenizer, args.show, colour))
    return 0


# ----------------------------------------------------------------------------- export


def add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint: RUN_DIR/checkpoints/step_N")
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) directory")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp32"),
        help="the weights' dtype (default: auto, as trained)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA: also write the merged model (in --out; the adapter goes to --out/adapter)",
    )
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """A DCP checkpoint (any number of ranks) as a save_pretrained model directory."""
    from sftune.train import export

    export.check_checkpoint(args.checkpoint)
    export.check_out(args.out)
    check_dependencies()
    out = export.export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, merge=args.merge)
    print(f"sftune: {args.checkpoint} -> {out}")
    return 0


# ----------------------------------------------------------------------------- main


USAGE_EXAMPLES = """examples:
  sftune train --config configs/demo.yaml             the CPU demo (what `make demo` runs)
  sftune train --model smollm2-135m --train-data examples/chats.jsonl \\
      --chat-template chatml --lora --seq-length 256   your own chats (the README's quickstart)
  sftune generate --model runs/X/final --prompt "What is 12 * 7?"
  sftune COMMAND --help                               a command's flags

The README has the rest: install, data formats, GPUs."""


def build_parser() -> argparse.ArgumentParser:
    # The module docstring is for developers; a user gets what the tool does and where to start.
    parser = _Parser(
        prog="sftune",
        description="Supervised fine-tuning (SFT) of causal language models on your own\n"
        "prompt/response or chat data, from a laptop CPU to many GPUs.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_train(sub.add_parser("train", help="fine-tune a model"))
    add_eval(sub.add_parser("eval", help="loss and perplexity on a file, or lm-eval task accuracy"))
    add_generate(sub.add_parser("generate", help="a model's response to a prompt"))
    add_prepare(sub.add_parser("prepare", help="build and cache a packed dataset"))
    add_export(sub.add_parser("export", help="a checkpoint as a model directory"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "verbose", False):
            # Before any command imports transformers (which imports torchao, the fp8 extra,
            # when installed): its notes on optional CUDA kernels and enums are not ours.
            for name in ("torchao", "torch.utils._pytree"):
                logging.getLogger(name).setLevel(logging.ERROR)
        return int(args.func(args) or 0)
    except SftuneError as e:
        print(f"sftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftune: interrupted", file=sys.stderr)
        return 130
