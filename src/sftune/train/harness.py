"""Task accuracy through EleutherAI's lm-evaluation-harness, on a model already in memory.

    specs = resolve_tasks("gsm8k", "gsm8k=test.jsonl")          # sftune.tasks: checked, no lm-eval
    results = run_tasks(model, tokenizer, specs, limit=100, batch_size=8)
    print(table(results))       # lm-eval's table: task, filter, n-shot, metric, value, stderr
    metrics(results)            # {"task/gsm8k/exact_match/strict-match": 0.04, ..._stderr...}

    sftune eval --model runs/x/final --tasks gsm8k --task-data gsm8k=test.jsonl --limit 100

The model is handed to lm-eval's `HFLM` as it is (no save and reload): `sftune eval` passes the
model it loaded, the trainer the model it is training (sftune.train.loop). lm-eval and its
dependencies are imported on first use only, so nothing here costs anything when no task is
asked for. Its `evaluate` runs the tasks; `simple_evaluate` is not used because it also reseeds
the process's RNGs (which would change the rest of a training run) and collects pip and
driver information on every call (3.5 s on 2 CPU cores).

Offline: every task reads local files (sftune.tasks made sure of that), HF_DATASETS_OFFLINE and
HF_HUB_OFFLINE are set unless the user set them, and the task YAMLs are loaded from a
temporary folder of one-line YAMLs that `include:` the real one and set its data files, with
lm-eval's own task folders left out of the index.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftune.tasks import TaskSpec, check_installed, go_offline, prompt_overrides
from sftune.train.metrics import TASK_PREFIX, task_label, task_stderr_key

FEWSHOT_SEED = 1234  # lm-eval's default
RESULTS_FILE = "eval_results.json"  # what `sftune eval --tasks` writes


def default_batch_size(device: torch.device) -> int:
    """Prompts per generation batch: a 135M model decodes 64 at a time easily on a GPU."""
    return 64 if device.type == "cuda" else 8


def run_tasks(
    model: torch.nn.Module,
    tokenizer,
    specs: list[TaskSpec],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_gen_toks: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    log_samples: bool = False,
    progress: bool = True,
    verbose: bool = False,
    prompt_format: str = "alpaca",
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """lm-eval's results dict for `specs` on `model` (a Hugging Face causal LM, in memory).

    `limit`: the first K documents of each task; `max_gen_toks` caps generation (else each
    task's own cap); `autocast_dtype`: bf16 autocast for a model trained with bf16-mixed;
    `prompt_format`: "alpaca" (each task's prompt in the Alpaca template) or "chat" (the
    tokenizer's chat template, opened with `system_prompt` when given; few-shot examples as
    earlier turns). The model comes back in the train/eval mode it had, and the RNGs in the
    state they had.
    """
    if prompt_format not in ("alpaca", "chat"):
        raise ValueError(f"prompt_format {prompt_format!r}")
    chat = prompt_format == "chat"
    check_installed()
    go_offline()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    try:
        with (
            tempfile.TemporaryDirectory(prefix=".sftune-tasks-") as tmp,
            _quiet(verbose, progress),
            _rng_kept(),
            _eager(),
        ):
            folder = _task_folder(specs, Path(tmp), prompt_format)
            manager = TaskManager(include_path=folder, include_defaults=False)
            loaded = manager.load([s.name for s in specs])
            for task in loaded["tasks"].values():
                _configure(task, max_gen_toks)
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                mixed_precision_dtype=autocast_dtype,
            )
            return evaluate(
                lm=lm,
                task_dict=loaded,
                limit=limit or None,
                log_samples=log_samples,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                system_instruction=system_prompt if chat else None,
            )
    finally:
        model.train(was_training)


def _task_folder(specs: list[TaskSpec], folder: Path, prompt_format: str) -> str:
    """One YAML per task that includes the real one and sets what sftune sets (data files,
    the prompt in the Alpaca template)."""
    for spec in specs:
        keys = {**spec.overrides, **prompt_overrides(spec, prompt_format)}
        text = json.dumps({"include": str(spec.yaml_path), "task": spec.name, **keys})
        (folder / f"{spec.name}.yaml").write_text(text + "\n", encoding="utf-8")
    return str(folder)


def _configure(task, max_gen_toks: int | None) -> None:
    """What simple_evaluate would set: a generation cap, 0 shots by default, the few-shot seed."""
    if max_gen_toks and task.get_config("output_type") == "generate_until":
        task.set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)


@contextlib.contextmanager
def _quiet(verbose: bool, progress: bool) -> Iterator[None]:
    """lm-eval's and datasets' info logs and bars folded away unless --verbose; lm-eval's
    progress bars (tqdm, on stderr) kept only when `progress` (the trainer has its own)."""
    if verbose:
        yield
        return
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        with contextlib.ExitStack() as stack:
            if not progress:  # lm-eval passes tqdm's `disable` itself: only stderr can hide them
                devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115
                stack.enter_context(contextlib.redirect_stderr(devnull))
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Evaluating leaves Python's, NumPy's and torch's RNGs as they were (exact resume)."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(
        devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []
    ):
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _eager():
    """Compiled decoder layers would recompile for every KV-cache length: decode eagerly."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


# ----------------------------------------------------------------------------- results


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """{"task/<task>/<metric>/<filter>": value} and `..._stderr/<filter>` for every number lm-eval
    reported (the filter is left out when it is "none")."""
    out: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # "alias", "name", "sample_len", ...
            name = f"{TASK_PREFIX}{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            out[name] = float(value)
    return out


def headline(results: dict[str, Any]) -> list[str]:
    """One short line per task and metric: `gsm8k exact_match (strict-match) 0.0400 ± 0.0139`."""
    values = metrics(results)
    lines = []
    for key, value in values.items():
        if "_stderr" in key:
            continue
        err = values.get(task_stderr_key(key))
        lines.append(
            f"{task_label(key)} {value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
        )
    return lines


def table(results: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of the results."""
    from lm_eval.utils import make_table

    return make_table(results)


def to_json(results: dict[str, Any], extra: dict[str, Any]) -> str:
    """The results as JSON (numpy numbers as plain ones), with `extra` under "sftune"."""
    keep = {k: v for k, v in results.items() if k != "samples"}
    return json.dumps({**keep, "sftune": extra}, indent=2, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def evaluate_model(
    model: str,
    specs: list[TaskSpec],
    out: Path,
    *,
    limit: int = 0,
    batch_size: int = 0,
    max_gen_toks: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    prompt_format: str = "auto",
    log_samples: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """`sftune eval --tasks`: a saved model (or adapter, or preset) on `specs`, its prompts in
    `prompt_format` (auto: the one it was tuned with, `task_prompt_format`); prints lm-eval's
    table and writes <out>/eval_results.json (and eval_samples_<task>.jsonl with log_samples)."""
    import time

    from sftune.files import atomic_write_lines, atomic_write_text
    from sftune.models import quiet_libraries
    from sftune.train import distributed
    from sftune.transforms.lora import load_for_inference

    quiet_libraries(verbose)
    dev = distributed.resolve_device(device, distributed.World())
    lm, tokenizer, info = load_for_inference(model, device=dev, dtype=dtype)
    fmt, why, system_prompt = task_prompt_format(model, tokenizer, prompt_format)
    batch = batch_size or default_batch_size(dev)
    start = time.perf_counter()
    results = run_tasks(
        lm,
        tokenizer,
        specs,
        limit=limit or None,
        batch_size=batch,
        max_gen_toks=max_gen_toks or None,
        log_samples=log_samples,
        verbose=verbose,
        prompt_format=fmt,
        system_prompt=system_prompt,
    )
    seconds = time.perf_counter() - start
    extra = {
        "model": model,
        "prompt_format": fmt,
        "prompt_format_source": why,
        "system_prompt": system_prompt,
        "tasks": {s.name: {"yaml": str(s.yaml_path), **s.overrides} for s in specs},
        "limit": limit or None,
        "batch_size": batch,
        "max_gen_toks": max_gen_toks or None,
        "device": str(dev),
        "dtype": info.dtype,
        "seconds": round(seconds, 2),
    }
    atomic_write_text(out / RESULTS_FILE, to_json(results, extra))
    for task, rows in (results.get("samples") or {}).items() if log_samples else ():
        atomic_write_lines(
            out / f"eval_samples_{task}.jsonl", (json.dumps(r, default=_plain) for r in rows)
        )
    print(table(results))  # after the results are on disk: minutes of generation are never lost
    done = sum(n["effective"] for n in results.get("n-samples", {}).values())
    print(
        f"{done} problems in {seconds:.1f} s on {dev} | prompt format {fmt} ({why}) | "
        f"{out / RESULTS_FILE}"
    )
    return results


def task_prompt_format(model: str, tokenizer, requested: str) -> tuple[str, str, str | None]:
    """(format, why, system prompt) of `sftune eval --tasks`' prompts: --prompt-format, else
    what the model's sftune.json says it was tuned with, else (with a warning: a guess) the
    chat template when the tokenizer has one, else Alpaca."""
    import sys

    from sftune.train.generate import prompt_format, tuned_settings

    meta, where = tuned_settings(model)
    fmt = prompt_format(meta, tokenizer, requested)
    tuned = meta.get("prompt_format")
    if requested != "auto":
        why = "--prompt-format"
        if tuned in ("alpaca", "chat") and tuned != fmt:
            print(
                f"sftune: warning: {model} was tuned with {tuned} prompts ({where}); scoring "
                f"it with {fmt} ones as --prompt-format asks",
                file=sys.stderr,
            )
    elif meta.get("prompt_format") in ("alpaca", "chat"):
        why = f"tuned with it: {where}"
    else:
        why = "guessed: no sftune.json, " + (
            "the tokenizer has a chat template" if fmt == "chat" else "no chat template"
        )
        print(
            f"sftune: warning: {model} has no sftune.json saying how it was tuned: its prompts "
            f"are rendered as {fmt} ({why.split(', ', 1)[1]}); pass --prompt-format alpaca|chat "
            "to choose",
            file=sys.stderr,
        )
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        from sftune.errors import SftuneError

        raise SftuneError(f"--prompt-format chat: the tokenizer of {model} has no chat template")
    return fmt, why, meta.get("system_prompt") if fmt == "chat" else None


def eval_copy(tokenizer):
    """A tokenizer of its own for lm-eval, which sets a pad token and padding side on it."""
    return copy.deepcopy(tokenizer)
