"""The training loop: `sftune train`, the same code on a CPU, one GPU or many (DDP or FSDP2).

    sftune train --config configs/demo.yaml
    sftune train --model DIR --train-data train.jsonl --val-data val.jsonl --lr 2e-5
    torchrun --standalone --nproc-per-node 8 -m sftune train --model DIR --train-data train.jsonl

`build` (train/build.py) makes everything once; `run` below reads top to bottom: resume,
validate, then per step `train_step` (train/step.py), log, evaluate, save; at the end a last
validation and the `save_pretrained` model. The host synchronises only when it logs,
evaluates or saves.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sftune.config import RunConfig
from sftune.errors import SftuneError
from sftune.files import atomic_write_text, raise_if_disk_full
from sftune.train import checkpoint, distributed, harness
from sftune.train.build import Run, build
from sftune.train.divergence import Diverged, LossSpikes, check_weights
from sftune.train.evaluate import EvalInterrupted, eval_items, evaluate_pass
from sftune.train.generate import FORMAT_FILE, generate, tuned_meta
from sftune.train.metrics import format_step_metrics, read_metrics, task_curves, task_label
from sftune.train.progress import ConsoleProgress
from sftune.train.step import micro_batches, train_step
from sftune.transforms import lora


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens seen, all ranks
    trained_tokens: int = 0  # label tokens trained on (not -100), all ranks
    pairs: int = 0  # preference pairs trained on, all ranks (0 for SFT)
    elapsed: float = 0.0  # seconds spent in training steps (not evals or saves), all processes
    eval_pending: bool = False  # this step's validation was interrupted: a resume runs it first


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    val_loss_start: float | None
    val_loss_end: float | None
    interrupted: bool = False


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step
    (or, during validation, after the current micro-batch).

    The handlers are installed even where the process inherited SIGINT as ignored (started in
    the background by a shell), so `kill -INT` always stops a run within seconds.
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            # signal.signal raises ValueError outside the main thread (e.g. a worker thread).
            with contextlib.suppress(ValueError):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective under torchrun: call it in step)."""
        if not self.run.world.distributed:
            return self.signum is not None
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=self.run.device)
        return bool(distributed.all_reduce_max(flag).item())


# ----------------------------------------------------------------------------- evaluation


def validate(r: Run, state: TrainState, bar: ConsoleProgress, stop: StopFlag) -> float:
    """A validation pass (with its own progress bar), logged; then samples and the curve."""
    start = time.perf_counter()
    mb = r.micro_batch_size
    n = eval_items(len(r.val_data), r.cfg.log.eval_max_sequences)
    batches = math.ceil(math.ceil(n / r.world.world_size) / mb)
    with bar.eval_bar(batches) as eval_bar:
        row, count = evaluate_pass(
            r.module,
            r.val_data,
            objective=r.objective,
            micro_batch_size=mb,
            device=r.device,
            world=r.world,
            max_sequences=r.cfg.log.eval_max_sequences,
            varlen=r.varlen,
            on_batch=eval_bar.update,
            stop_requested=stop.agreed,
        )
    val = row["val_loss"]
    if not math.isfinite(val):  # weights that are finite but useless: nothing saves them
        raise Diverged(f"non-finite validation loss at step {state.step}", state.step)
    if count == 0:  # the same sequences every pass: this happens at step 0, before training
        raise SftuneError(
            f"{r.val_data.path}: nothing scored in the first {n} validation sequence(s) "
            f"(--train-on {r.cfg.data.train_on}): raise --eval-max-sequences or check the data"
        )
    r.logger.log(
        state.step,
        {**row, "tokens": state.tokens, "eval_seconds": time.perf_counter() - start},
    )
    bar.write(f"step {state.step:>6} | {val_line(row)}")
    write_samples(r, state.step, bar)
    r.logger.plot()
    return val


def val_line(row: dict[str, float]) -> str:
    """`val_loss 1.2345 | ppl 3.44`; a preference run's: `val_loss 0.6931 | val_acc 0.00 |
    val_margin 0.00` (the rewards' accuracy and margin on the held-out pairs)."""
    val = row["val_loss"]
    rewards = format_step_metrics(row)
    return f"val_loss {val:.4f} | " + (rewards or f"ppl {math.exp(min(val, 50)):.2f}")


def write_samples(r: Run, step: int, bar: ConsoleProgress) -> None:
    """Greedy generations from the validation prompts, to samples.jsonl and the console."""
    rows, extras = [], []
    for sample in r.sample_prompts:
        text = generate(
            r.module,
            r.tokenizer,
            r.tokenizer(sample.rendered)["input_ids"],
            max_new_tokens=r.cfg.log.max_new_tokens,
            sharded=r.sharded,
        )
        rows.append((sample.shown, text))
        extras.append(sample.record)
        bar.write(f"  sample | {sample.shown} -> {text[:120]!r}")
    if rows:
        r.logger.log_text(step, "samples", rows, extras)


def evaluate_tasks(r: Run, state: TrainState, bar: ConsoleProgress) -> None:
    """lm-eval's tasks on the model in training, on rank 0 (the other ranks wait), logged as
    task/<task>/<metric>[/<filter>] and drawn beside the losses."""
    start = time.perf_counter()
    model = task_model(r)
    if model is not None:
        cfg = r.cfg
        results = harness.run_tasks(
            model,
            r.task_tokenizer,
            list(r.task_specs),
            limit=cfg.tasks.eval_limit or None,
            batch_size=cfg.tasks.task_batch_size,
            autocast_dtype=r.module.autocast_dtype,
            progress=False,
            verbose=cfg.log.verbose,
            prompt_format=cfg.tasks.task_prompt_format,
            system_prompt=cfg.data.system_prompt,
        )
        seconds = time.perf_counter() - start
        r.logger.log(state.step, {**harness.metrics(results), "task_eval_seconds": seconds})
        for line in harness.headline(results):
            bar.write(f"step {state.step:>6} | {line} | {seconds:.0f} s")
        r.logger.plot()
    del model
    distributed.barrier()


def task_model(r: Run) -> torch.nn.Module | None:
    """The model lm-eval gets, on rank 0 (None elsewhere): the Hugging Face model in training
    itself; under FSDP an unsharded copy on rank 0's device, gathered from all ranks (a
    collective), with LoRA adapters merged in."""
    if not r.sharded:
        return r.hf_model if r.world.is_main else None
    state = checkpoint.full_model_state_dict(r.module)
    if not r.world.is_main:
        return None
    if r.adapter is not None:
        state = lora.merged_state_dict(state, lora.scaling(r.cfg))
    from transformers import AutoModelForCausalLM

    dtype = next(iter(state.values())).dtype
    with torch.device(r.device):
        model = AutoModelForCausalLM.from_config(r.hf_model.config, dtype=dtype)
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------- logging


class Window:
    """The steps since the last log line: one tensor each of (loss share, grad norm, the step's
    counts, this rank's metric sums), as `train_step` returns them; and the recent losses that a
    step's loss is compared with to flag a spike."""

    def __init__(self, state: TrainState) -> None:
        self.spikes = LossSpikes()
        self.reset(state)

    def reset(self, state: TrainState) -> None:
        self.steps: list[torch.Tensor] = []
        self.start = time.perf_counter()
        self.start_tokens = state.tokens

    def add(self, loss, norm, counts: torch.Tensor, sums: torch.Tensor) -> None:
        parts = (loss.reshape(1), norm.reshape(1), counts, sums)
        self.steps.append(torch.cat([t.double() for t in parts]))
        self.widths = (len(counts), len(sums))


def flush(r: Run, state: TrainState, window: Window, bar: ConsoleProgress) -> None:
    """Logs the window's steps with one host synchronisation and flags loss spikes; stops
    (Diverged) at a step whose loss or gradient norm is not finite, logging the steps before it."""
    if not window.steps:
        return
    seconds = time.perf_counter() - window.start
    state.elapsed += seconds
    stacked = torch.stack(window.steps)
    # Each rank holds its share of every step's loss and its metric sums; norm and counts are
    # already global.
    width = window.widths[0]
    local = [0, *range(2 + width, stacked.shape[1])]
    stacked[:, local] = distributed.all_reduce_sum(stacked[:, local].contiguous())
    values = stacked.tolist()  # the one host synchronisation
    first = state.step - len(values) + 1
    # Every step of the window goes to metrics.jsonl so curves have full resolution.
    rows, counted = [], []
    for loss, norm, *rest in values:
        counts, sums = rest[:width], rest[width:]
        rows.append({"train_loss": loss, "grad_norm": norm, **r.objective.train_row(sums, counts)})
        counted.append(r.objective.counters(counts))
    for k, row in enumerate(rows):
        if not all(math.isfinite(v) for v in row.values()):
            for j in range(k):  # the curve up to the divergence
                r.logger.log(first + j, rows[j])
            what = "loss" if not math.isfinite(row["train_loss"]) else "gradient norm"
            loss, norm = row["train_loss"], row["grad_norm"]
            raise Diverged(
                f"non-finite {what} at step {first + k} (loss {loss}, gradient norm {norm})",
                first + k - 1,
            )
        median = window.spikes.check(row["train_loss"])
        if median is not None:
            row["loss_spike"] = True
            bar.write(
                f"step {first + k:>6} | warning: loss spike: {row['train_loss']:.4g}, the recent "
                f"median is {median:.4g} (a lower --lr or a longer --warmup-ratio may help)"
            )
    pairs = sum(p for _, p in counted)
    state.trained_tokens += sum(t for t, _ in counted)
    state.pairs += pairs
    tok_s = (state.tokens - window.start_tokens) / max(seconds, 1e-9)
    loss = rows[-1]["train_loss"]
    lr = float(r.scheduler.get_last_lr()[0])
    rows[-1] |= {
        "lr": lr,
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "tokens_per_s": tok_s,
        "train_seconds": state.elapsed,  # training steps only, summed across resumes
        "epoch": state.tokens / max(r.tokens_per_epoch, 1),
    }
    if state.pairs:
        rows[-1] |= {"pairs": state.pairs, "pairs_per_s": pairs / max(seconds, 1e-9)}
    if r.flops_per_token and r.peak_flops:
        rows[-1]["mfu"] = tok_s * r.flops_per_token / (r.peak_flops * r.world.world_size)
    if r.device.type == "cuda":
        rows[-1]["peak_mem_gib"] = torch.cuda.max_memory_allocated(r.device) / 2**30
    for k, row in enumerate(rows):
        r.logger.log(first + k, row)
    bar.update(len(rows), loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
    window.reset(state)


# ----------------------------------------------------------------------------- checkpoints


def save(r: Run, state: TrainState, window: Window, bar: ConsoleProgress) -> Path:
    """A checkpoint of step `state.step`; never of a diverged run: the steps not yet logged
    (a GPU logs every --log-every steps) are checked first, then the weights."""
    flush(r, state, window, bar)
    check_weights(r.module, r.device, state.step)
    trainer_state = {
        "train": asdict(state),
        "sampler": r.sampler.state_dict(),
        "scheduler": r.scheduler.state_dict(),
        "prompt_format": r.prompt_format,  # for `sftune export`, which writes sftune.json too
        "data": r.data_digests,  # a resume refuses data files whose bytes changed
        "data_format": r.train_data.format,
        # The --chat-template text itself: export needs no FILE that may have moved since.
        "chat_template": r.tokenizer.chat_template if r.cfg.data.chat_template else None,
    }
    path = checkpoint.save(
        r.output_dir,
        state.step,
        r.module,
        r.optimizer,
        trainer_state,
        r.cfg,
        r.world,
        r.cfg.checkpoint.keep_checkpoints,
        adapters_only=r.adapter is not None,
    )
    bar.write(f"step {state.step:>6} | checkpoint {path}")
    return path


def resume(r: Run) -> tuple[TrainState, str]:
    path = r.resume_from
    saved = checkpoint.load(
        path, r.module, r.optimizer, r.world, adapters_only=r.adapter is not None
    )
    r.scheduler.load_state_dict(saved["scheduler"])
    try:
        r.sampler.load_state_dict(saved["sampler"])
    except ValueError as e:
        raise SftuneError(f"{path}: cannot resume: {e}") from None
    state = TrainState(**saved["train"])
    # Resumed at its last step, a run validates (and samples, scores its tasks) there again:
    # the rows of an evaluation logged before the kill go, or that step would have two.
    r.logger.truncate_after(state.step, redo_evaluation=state.step >= r.total_steps)
    return state, f"sftune: resumed from {path} at step {state.step}"


def save_final(r: Run, step: int) -> Path:
    """model + tokenizer (save_pretrained) and how it was tuned (sftune.json), which `sftune
    generate` and `sftune eval` read: the prompt format, the sequence length, the data format
    and the trained labels, and the system prompt of a chat run. Never from non-finite weights."""
    check_weights(r.module, r.device, step)
    final = checkpoint.save_final(
        r.output_dir, r.module, r.hf_model, r.tokenizer, r.world, write_model=_lora_writer(r)
    )
    if r.world.is_main:
        meta = tuned_meta(r.cfg, r.prompt_format, r.train_data.format)
        atomic_write_text(final / FORMAT_FILE, json.dumps(meta))
    return final


def save_final_or_keep(
    r: Run, state: TrainState, window: Window, bar: ConsoleProgress, last_saved: int
) -> Path:
    """final/, or where it cannot be written (a full disk) a checkpoint of the last step, from
    which `sftune export` writes the same model; the one-line error says what survived."""
    try:
        return save_final(r, state.step)
    except Diverged:
        raise  # nothing of a diverged run is saved
    except SftuneError as e:
        error = f"{e}; final/ was not written"
    if last_saved != state.step:
        try:
            save(r, state, window, bar)
            last_saved = state.step
        except SftuneError:
            error += f", nor a checkpoint of step {state.step}"
    kept = checkpoint.list_checkpoints(r.output_dir)
    if last_saved == state.step:
        ckpt = checkpoint.checkpoint_dir(r.output_dir, state.step)
        error += (
            f"; {ckpt} holds step {state.step}: `sftune export {ckpt} --out DIR` writes the model"
        )
    elif kept:
        error += f"; the newest checkpoint is {kept[-1]}: free some space and --resume latest"
    else:
        error += "; no checkpoint survived: free some space and train again"
    raise SftuneError(error)


def _lora_writer(r: Run):
    """With adapters: final/adapter (PEFT's format) and the merged model in final/."""
    if r.adapter is None:
        return None

    def write(state: dict, out: Path) -> None:
        lora.save_adapter(r.adapter.peft_config["default"], state, out / lora.ADAPTER_DIR, r.source)
        base = None
        if r.cfg.adapter.qlora:  # the adapters go onto the bf16 base, not the 4-bit one
            base = lora.load_base_weights(r.source, torch.bfloat16)
        merged = lora.merged_state_dict(state, lora.scaling(r.cfg), base)
        lora.save_merged(merged, r.hf_model.config, out)

    return write


# ----------------------------------------------------------------------------- the loop


def run(r: Run) -> TrainResult:
    cfg = r.cfg
    checkpoint.remove_stale_temps(r.output_dir, r.world)  # a killed run's half-written saves
    state, resumed = resume(r) if r.resume_from else (TrainState(), None)
    bar = ConsoleProgress(r.total_steps, initial=state.step, enabled=r.world.is_main)
    bar.write("\n".join([r.describe(), *([resumed] if resumed else [])]))
    last_saved = state.step if r.resume_from else -1
    val_start = val_end = None
    window = Window(state)
    with StopFlag(r) as stop, bar:
        try:
            val_start = evaluate_before_training(r, state, bar, stop)
            window.reset(state)  # evaluations are not training time
            while state.step < r.total_steps:
                batches = micro_batches(
                    r.train_data, r.sampler.next_indices(), r.micro_batch_size, r.device, r.varlen
                )
                window.add(
                    *train_step(
                        r.module,
                        r.optimizer,
                        r.scheduler,
                        batches,
                        objective=r.objective,
                        world_size=r.world.world_size,
                        grad_clip=cfg.optim.grad_clip,
                    )
                )
                state.step += 1
                state.tokens += cfg.optim.batch_size * cfg.data.seq_length
                every = _due(cfg, state.step)
                # The CPU has no asynchronous work to lose by syncing: log every step there.
                if r.device.type == "cpu" or any(every.values()):
                    flush(r, state, window, bar)
                if every["eval"] and state.step < r.total_steps:
                    validate(r, state, bar, stop)
                if every["tasks"] and state.step < r.total_steps:
                    evaluate_tasks(r, state, bar)
                if every["save"]:
                    save(r, state, window, bar)
                    last_saved = state.step
                if every["eval"] or every["tasks"] or every["save"]:  # not training time
                    window.reset(state)
                # Under torchrun agreeing is a collective, so only at log steps.
                if (every["log"] or not r.world.distributed) and stop.agreed():
                    break
            flush(r, state, window, bar)
            if state.step == r.total_steps:
                val_end = validate(r, state, bar, stop)
                if r.task_specs:
                    evaluate_tasks(r, state, bar)
        except EvalInterrupted:
            # A validation between steps is owed to the curve: the checkpoint below records it,
            # and the resumed run runs it first. (The last one is run again anyway; the first
            # has no checkpoint: its run starts over.)
            state.eval_pending = 0 < state.step < r.total_steps
        if state.step < r.total_steps or val_end is None:  # stopped by SIGINT / SIGTERM
            if last_saved != state.step and state.step > 0:
                save(r, state, window, bar)
            bar.write(  # the command's settings are read from the run directory
                f"interrupted at step {state.step}; resume with --resume latest --output-dir "
                f"{shlex.quote(str(r.output_dir))}"
            )
            return TrainResult(r.output_dir, None, state.step, val_start, None, interrupted=True)
    if cfg.checkpoint.save_every and last_saved != state.step:
        save(r, state, window, bar)  # checkpoints were asked for: the last one can extend the run
        last_saved = state.step
    final = (
        save_final_or_keep(r, state, window, bar, last_saved) if cfg.checkpoint.save_final else None
    )
    return TrainResult(r.output_dir, final, state.step, val_start, val_end)


def evaluate_before_training(
    r: Run, state: TrainState, bar: ConsoleProgress, stop: StopFlag
) -> float | None:
    """At step 0 the starting point (its validation loss is returned); after a resume, the
    evaluations of the step whose validation the interrupted run did not finish."""
    if state.step == 0:
        val = validate(r, state, bar, stop)
        if r.task_specs:
            evaluate_tasks(r, state, bar)
        return val
    if state.eval_pending:
        validate(r, state, bar, stop)
        if _due(r.cfg, state.step)["tasks"]:
            evaluate_tasks(r, state, bar)
        state.eval_pending = False
    return None


def _due(cfg: RunConfig, step: int) -> dict[str, bool]:
    """What the loop does after `step`: log a line, evaluate, score the tasks, save a checkpoint."""

    def every(n: int) -> bool:
        return bool(n) and step % n == 0

    return {
        "log": every(cfg.log.log_every),
        "eval": every(cfg.log.eval_every),
        "tasks": bool(cfg.tasks.names) and every(cfg.tasks.eval_tasks_every),
        "save": every(cfg.checkpoint.save_every),
    }


def train(cfg: RunConfig) -> TrainResult:
    """Runs `sftune train` for a validated config; returns where things were written."""
    r = build(cfg)
    try:
        result = run(r)
    except torch.cuda.OutOfMemoryError:
        raise SftuneError(
            f"out of GPU memory at micro-batch {r.micro_batch_size} x {r.cfg.data.seq_length} "
            "tokens: lower --micro-batch-size or --seq-length, or add --activation-checkpointing"
        ) from None
    except Diverged as e:
        where = last_good(r.output_dir, e.weights_step)
        hint = "try a lower --lr"
        if r.cfg.model.dtype == "fp16":  # AdamW's eps and squared gradients underflow there
            hint = "fp16 weights cannot hold AdamW's update: use --dtype bf16 or bf16-mixed"
        raise Diverged(
            f"{e}: stopping, nothing of it saved; {where}; {hint}", e.weights_step
        ) from None
    except OSError as e:  # a log, sample or curve write that filled the disk: one line
        raise_if_disk_full(e.filename or r.output_dir, e)
        raise
    finally:
        r.close()
    if r.world.is_main:
        print_summary(result)
    return result


def last_good(output_dir: Path, weights_step: int) -> str:
    """Where a diverged run can go back to: the newest checkpoint before the weights that were
    found bad (every checkpoint is finite, since every save checks first; one of the step before
    a non-finite loss is finite, but it gave that loss)."""
    steps = {int(p.name.rpartition("_")[2]): p for p in checkpoint.list_checkpoints(output_dir)}
    good = [p for step, p in steps.items() if step < weights_step]
    said = f"the last good checkpoint is {good[-1]}" if good else "there is no good checkpoint"
    if weights_step in steps:
        said += f" ({steps[weights_step]} holds the weights that gave it)"
    return said


def print_summary(result: TrainResult) -> None:
    out = result.output_dir
    print(f"run directory : {out}")
    if result.val_loss_start is not None and result.val_loss_end is not None:
        print(f"val loss      : {result.val_loss_start:.4f} -> {result.val_loss_end:.4f}")
    elif result.val_loss_end is not None:
        print(f"val loss      : {result.val_loss_end:.4f}")
    if result.final_dir:
        print(f"model         : {result.final_dir}")
    for key, points in task_curves(read_metrics(out)).items():
        print(f"{task_label(key)}: " + " -> ".join(f"{v:.4f} (step {s})" for s, v in points))
    print(f"metrics       : {out / 'metrics.jsonl'}")
    print(f"learning curve: {out / 'learning_curve.png'}")
