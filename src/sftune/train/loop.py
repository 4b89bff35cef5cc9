"""The training loop: `sftune train`, the same code on a CPU, one GPU or many (torchrun + FSDP2).

    sftune train --config configs/demo.yaml
    sftune train --model DIR --train-data train.jsonl --val-data val.jsonl --lr 2e-5
    torchrun --standalone --nproc-per-node 8 -m sftune train --model DIR --train-data train.jsonl

Per optimizer step (see `train_step`): every rank counts the trained tokens of its micro-batches,
one all-reduce gives the step's global count N, and each micro-batch contributes
sum(CE) / N to the loss, so accumulation and the number of ranks never change the gradient.
No `.item()` inside a step: the host synchronises only when it logs, evaluates or saves.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sftune.config import RunConfig
from sftune.data.sampler import StepSampler
from sftune.errors import SftuneError
from sftune.train import checkpoint, distributed
from sftune.train.loss import IGNORE_INDEX
from sftune.train.optim import build_optimizer
from sftune.train.setup import Setup, build


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens seen, all ranks
    trained_tokens: int = 0  # label tokens trained on (not -100), all ranks
    elapsed: float = 0.0  # seconds spent in training steps (not evals or saves), all processes


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    val_loss_start: float | None
    val_loss_end: float | None
    interrupted: bool = False


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopFlag:
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


def total_steps(cfg: RunConfig, steps_per_epoch: int) -> int:
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    return max(1, math.ceil(cfg.optim.epochs * steps_per_epoch))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def flatten_for_varlen(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T) -> (1, B*T): flash-attn's variable-length path reads documents off position_ids."""
    return {k: v.reshape(1, -1) for k, v in batch.items()}


def micro_batches(s: Setup, indices) -> list[dict[str, torch.Tensor]]:
    out = []
    for lo in range(0, len(indices), s.micro_batch_size):
        batch = to_device(s.train_data.get_batch(indices[lo : lo + s.micro_batch_size]), s.device)
        out.append(flatten_for_varlen(batch) if s.varlen else batch)
    return out


def train_step(
    s: Setup, optimizer, scheduler, batches
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step. Returns (this rank's share of the step loss, grad norm, global trained
    tokens) as tensors; the shares of all ranks sum to the step's token-weighted mean loss."""
    count = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).float()
    global_count = distributed.all_reduce_sum(count.clone())
    # Each rank's gradient is averaged over ranks by FSDP/all-reduce, hence the world size.
    scale = s.world.world_size / global_count.clamp(min=1.0)
    loss_sum = torch.zeros((), device=s.device)
    for i, b in enumerate(batches):
        distributed.set_grad_sync(s.module, i == len(batches) - 1)
        loss = s.module(b["input_ids"], b["labels"], b.get("position_ids"), scale)
        loss.backward()
        loss_sum += loss.detach()
    max_norm = s.cfg.optim.grad_clip if s.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = optimizer.clip_and_step(max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / s.world.world_size, grad_norm, global_count  # loss: this rank's share


@torch.no_grad()
def evaluate(s: Setup) -> float:
    """Token-weighted validation loss over the whole validation set (all ranks together)."""
    s.module.eval()
    mine = list(range(s.world.rank, len(s.val_data), s.world.world_size))
    mb = s.micro_batch_size
    forwards = torch.tensor([math.ceil(len(mine) / mb)], device=s.device)
    # Under FSDP every rank must run the same number of forwards (they gather parameters
    # together): ranks with fewer items run padding forwards whose loss is weighted 0.
    forwards = int(distributed.all_reduce_max(forwards).item())
    totals = torch.zeros(2, device=s.device)  # summed loss, trained tokens
    for i in range(forwards):
        chunk = mine[i * mb : (i + 1) * mb]
        weight = 1.0 if chunk else 0.0
        b = to_device(s.val_data.get_batch(chunk or [0]), s.device)
        if s.varlen:
            b = flatten_for_varlen(b)
        loss = s.module(b["input_ids"], b["labels"], b.get("position_ids"), 1.0)
        totals += torch.stack([loss, (b["labels"] != IGNORE_INDEX).sum().float()]) * weight
    totals = distributed.all_reduce_sum(totals)
    s.module.train()
    return float(totals[0] / totals[1].clamp(min=1.0))


def generate_samples(s: Setup, step: int) -> None:
    from sftune.train.lm import greedy_generate

    if not s.sample_prompts:
        return
    s.module.eval()
    rows = []
    for prompt, rendered in s.sample_prompts:
        ids = s.tokenizer(rendered)["input_ids"]
        out = greedy_generate(
            s.module, ids, s.cfg.log.max_new_tokens, s.tokenizer.eos_token_id, s.sharded
        )
        text = s.tokenizer.decode(out, skip_special_tokens=True)
        rows.append((prompt, text))
        s.progress.write(f"  sample | {prompt[:60]!r} -> {text[:120]!r}")
    s.logger.log_text(step, "samples", rows)
    s.module.train()


def _run_eval(s: Setup, state: TrainState) -> float:
    start = time.perf_counter()
    val = evaluate(s)
    s.logger.log(
        state.step,
        {"val_loss": val, "tokens": state.tokens, "eval_seconds": time.perf_counter() - start},
    )
    s.progress.write(
        f"step {state.step:>6} | val_loss {val:.4f} | ppl {math.exp(min(val, 50)):.2f}"
    )
    generate_samples(s, state.step)
    s.logger.plot()
    return val


def _save(s: Setup, state: TrainState, optimizer, scheduler, sampler) -> Path:
    trainer_state = {
        "train": asdict(state),
        "sampler": sampler.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    path = checkpoint.save(
        s.output_dir,
        state.step,
        s.module,
        optimizer,
        trainer_state,
        s.cfg,
        s.world,
        s.cfg.checkpoint.keep_checkpoints,
    )
    s.progress.write(f"step {state.step:>6} | checkpoint {path}")
    return path


def _resume(s: Setup, optimizer, scheduler, sampler) -> TrainState:
    path = checkpoint.resolve_resume(s.cfg.checkpoint.resume, s.output_dir)
    saved = checkpoint.load(path, s.module, optimizer, s.world)
    scheduler.load_state_dict(saved["scheduler"])
    try:
        sampler.load_state_dict(saved["sampler"])
    except ValueError as e:
        raise SftuneError(f"{path}: cannot resume: {e}") from None
    state = TrainState(**saved["train"])
    s.logger.truncate_after(state.step)
    s.notes.append(f"resumed from {path} at step {state.step}")
    return state


class _Window:
    """The steps since the last log line: one (loss share, grad norm, trained tokens) tensor each."""

    def __init__(self, state: TrainState) -> None:
        self.reset(state)

    def reset(self, state: TrainState) -> None:
        self.steps: list[torch.Tensor] = []
        self.start = time.perf_counter()
        self.start_tokens = state.tokens

    def add(self, loss: torch.Tensor, norm: torch.Tensor, trained: torch.Tensor) -> None:
        self.steps.append(torch.stack([loss.float(), norm.float(), trained.float()]))


def _flush(s: Setup, state: TrainState, window: _Window, lr: float) -> None:
    """Logs the window's steps with one host synchronisation; stops on a non-finite loss."""
    if not window.steps:
        return
    seconds = time.perf_counter() - window.start
    state.elapsed += seconds
    stacked = torch.stack(window.steps)
    # Each rank holds its share of every step's loss; norm and token counts are already global.
    stacked[:, 0] = distributed.all_reduce_sum(stacked[:, 0].contiguous())
    values = stacked.tolist()
    first = state.step - len(values) + 1
    for k, (loss, _, _) in enumerate(values):
        if not math.isfinite(loss):
            raise SftuneError(
                f"non-finite loss ({loss}) at step {first + k}: stopping; the last good checkpoint "
                f"is kept in {s.output_dir / 'checkpoints'} (try a lower --lr)"
            )
    state.trained_tokens += int(sum(v[2] for v in values))
    tok_s = (state.tokens - window.start_tokens) / max(seconds, 1e-9)
    loss, norm, _ = values[-1]
    metrics = {
        "train_loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "tokens_per_s": tok_s,
        "train_seconds": state.elapsed,  # training steps only, summed across resumes
        "epoch": state.tokens / max(s.tokens_per_epoch, 1),
    }
    if s.flops_per_token and s.peak_flops:
        metrics["mfu"] = tok_s * s.flops_per_token / (s.peak_flops * s.world.world_size)
    if s.device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    # Every step of the window goes to metrics.jsonl so curves have full resolution.
    for k, (l_k, n_k, _) in enumerate(values[:-1]):
        s.logger.log(first + k, {"train_loss": l_k, "grad_norm": n_k})
    s.logger.log(state.step, metrics)
    s.progress.update(len(values), loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
    window.reset(state)


def _stop_requested(s: Setup, stop: _StopFlag, state: TrainState) -> bool:
    if not s.world.distributed:
        return stop.signum is not None
    if state.step % s.cfg.log.log_every:  # agree across ranks at log steps only (a collective)
        return False
    flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=s.device)
    return bool(distributed.all_reduce_max(flag).item())


def run(s: Setup) -> TrainResult:
    cfg = s.cfg
    sampler = StepSampler(
        len(s.train_data),
        cfg.optim.batch_size,
        shuffle=cfg.data.shuffle,
        seed=cfg.optim.seed,
        rank=s.world.rank,
        world_size=s.world.world_size,
    )
    steps = total_steps(cfg, sampler.steps_per_epoch)
    optimizer, scheduler = build_optimizer(
        list(s.module.parameters()), cfg.optim, steps, s.device, compiled=s.compile_step
    )
    s.prepare_optimizer(optimizer)
    state = _resume(s, optimizer, scheduler, sampler) if cfg.checkpoint.resume else TrainState()
    s.progress = s.make_progress(steps, state.step)
    s.progress.write(s.describe(steps, sampler.steps_per_epoch))
    val_start = _run_eval(s, state) if state.step == 0 else None
    last_saved = state.step if cfg.checkpoint.resume else -1
    window = _Window(state)
    with _StopFlag() as stop:
        while state.step < steps:
            batches = micro_batches(s, sampler.next_indices())
            window.add(*train_step(s, optimizer, scheduler, batches))
            state.step += 1
            state.tokens += cfg.optim.batch_size * cfg.data.seq_length
            eval_now = bool(cfg.log.eval_every) and state.step % cfg.log.eval_every == 0
            save_now = (
                bool(cfg.checkpoint.save_every) and state.step % cfg.checkpoint.save_every == 0
            )
            # The CPU has no asynchronous work to lose by syncing: log every step there.
            if (
                s.device.type == "cpu"
                or state.step % cfg.log.log_every == 0
                or eval_now
                or save_now
            ):
                _flush(s, state, window, float(scheduler.get_last_lr()[0]))
            if eval_now and state.step < steps:
                _run_eval(s, state)
            if save_now:
                _save(s, state, optimizer, scheduler, sampler)
                last_saved = state.step
            if eval_now or save_now:  # evaluation and saving are not training time
                window.reset(state)
            if _stop_requested(s, stop, state):
                break
    _flush(s, state, window, float(scheduler.get_last_lr()[0]))
    if last_saved != state.step:
        _save(s, state, optimizer, scheduler, sampler)
    if state.step < steps:  # stopped by SIGINT / SIGTERM
        s.progress.write(
            f"interrupted at step {state.step}; resume with --resume latest --output-dir {s.output_dir}"
        )
        return TrainResult(s.output_dir, None, state.step, val_start, None, interrupted=True)
    val_end = _run_eval(s, state)
    final = None
    if cfg.checkpoint.save_final:
        final = checkpoint.save_final(s.output_dir, s.module, s.hf_model, s.tokenizer, s.world)
    return TrainResult(s.output_dir, final, state.step, val_start, val_end)


def train(cfg: RunConfig) -> TrainResult:
    """Runs `sftune train` for a validated config; returns where things were written."""
    s = build(cfg)
    try:
        result = run(s)
    except torch.cuda.OutOfMemoryError:
        raise SftuneError(
            f"out of GPU memory at micro-batch {s.micro_batch_size} x {cfg.data.seq_length} tokens: "
            "lower --micro-batch-size or --seq-length, or add --activation-checkpointing"
        ) from None
    finally:
        s.close()
    if s.world.is_main:
        _print_summary(s, result)
    return result


def _print_summary(s: Setup, r: TrainResult) -> None:
    out = s.output_dir
    print(f"run directory : {out}")
    if r.val_loss_start is not None and r.val_loss_end is not None:
        print(f"val loss      : {r.val_loss_start:.4f} -> {r.val_loss_end:.4f}")
    elif r.val_loss_end is not None:
        print(f"val loss      : {r.val_loss_end:.4f}")
    if r.final_dir:
        print(f"model         : {r.final_dir}")
    print(f"metrics       : {out / 'metrics.jsonl'}")
    print(f"learning curve: {out / 'learning_curve.png'}")
