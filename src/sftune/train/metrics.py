"""Run metrics: a JSON-lines file, optional wandb / TensorBoard, and the learning curve.

Everything a run measures goes through one `MetricsLogger`, which writes only on the main
process (rank 0) and costs nothing when disabled:

    logger = MetricsLogger("runs/alpaca", report_to=["tensorboard"], tokens_per_step=65536)
    logger.log(step, {"train_loss": 1.93, "lr": 2e-5, "tokens": 65536 * step})
    logger.log_text(step, "samples", [("Name three colors.", "Red, green and blue.")])
    logger.plot()    # runs/alpaca/learning_curve.png (drawn by sftune.train.plot)
    logger.close()

Files in the run directory:

    metrics.jsonl        {"step": 10, "train_loss": 1.93, "lr": 2e-05, ..., "time": 1718000000.0};
                         task accuracy as {"task/gsm8k/exact_match/strict-match": 0.04, ...};
                         a preference run's rewards/* and logps/* as they are (the keys are
                         listed in sftune.train.metric_rows)
    samples.jsonl        {"step": 10, "name": "samples", "prompt": "...", "output": "..."}
    learning_curve.png   train/val loss against optimizer steps and against tokens (and reward
                         accuracy and margin for a preference run, task accuracy with tasks)
    tensorboard/         only with report_to=["tensorboard"]  (pip install 'sftune[tensorboard]')
    wandb/, wandb_id.txt only with report_to=["wandb"]        (pip install 'sftune[wandb]')

Non-finite numbers are written as null so every line stays valid JSON. On resume the trainer
calls `truncate_after(step)` so that steps logged after the last checkpoint, and about to be
re-run, are not duplicated. Keys go to TensorBoard and wandb unchanged: both group a key such
as "rewards/margins" under its part before the "/". The console bar lives in
sftune.train.progress; `format_step_metrics(row)` is a row's reward metrics for a console line.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftune.config import REPORT_TO
from sftune.errors import ConfigError, SftuneError
from sftune.files import atomic_write_lines

# The readers of metrics.jsonl live in sftune.train.metric_rows, which the curve imports too;
# they are re-exported here for the loop and the harness, which import them from this module.
from sftune.train.metric_rows import (  # noqa: F401
    METRICS_FILE,
    TASK_PREFIX,
    format_step_metrics,
    read_jsonl,
    read_metrics,
    task_curves,
    task_label,
    task_stderr_key,
)

SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "learning_curve.png"
WANDB_ID_FILE = "wandb_id.txt"


def is_main_process() -> bool:
    """Whether this is rank 0, from torchrun's RANK: a safety net for callers that forget to
    pass enabled=is_main (here and in sftune.train.progress), without importing torch."""
    return int(os.environ.get("RANK", "0")) == 0


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: tensors and numpy scalars become Python numbers, NaN/inf become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _import_tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise SftuneError(
            "report_to includes 'tensorboard' but TensorBoard is not installed: "
            f"pip install 'sftune[tensorboard]' ({err})"
        ) from None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise SftuneError(
            f"report_to includes 'wandb' but wandb is not installed: pip install 'sftune[wandb]' ({err})"
        ) from None
    return wandb


class MetricsLogger:
    """Writes metrics for a run; only the main process (rank 0) writes anything.

    With `enabled=False` (or on a non-main rank) every method is a no-op: no files, no imports.
    A fresh run (`resume=False`) starts new metrics.jsonl / samples.jsonl files; a resumed run
    appends to them (call `truncate_after(step)` first).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        report_to: Sequence[str] = (),
        enabled: bool = True,
        run_name: str | None = None,
        config: dict | None = None,
        tokens_per_step: int | None = None,
        resume: bool = False,
    ):
        if isinstance(report_to, str):
            report_to = [report_to]
        backends = [b for b in report_to if b != "none"]
        unknown = sorted(set(backends) - set(REPORT_TO))
        if unknown:
            raise ConfigError(f"report_to: unknown {unknown}; choose from {list(REPORT_TO)}")
        self.run_dir = Path(run_dir)
        self.enabled = enabled and is_main_process()
        self.run_name = run_name
        self.config = config
        self.tokens_per_step = tokens_per_step
        self.resume = resume
        self._tb = None
        self._wandb = None
        self._wandb_run = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in (METRICS_FILE, SAMPLES_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
        if "tensorboard" in backends:
            self._tb = self._build_tensorboard()
        if "wandb" in backends:
            self._build_wandb()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def samples_path(self) -> Path:
        return self.run_dir / SAMPLES_FILE

    def _build_tensorboard(self, purge_step: int | None = None):
        summary_writer = _import_tensorboard()
        writer = summary_writer(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
        if self.config is not None and purge_step is None:
            text = json.dumps(self.config, indent=2, default=str)
            writer.add_text("config", f"```\n{text}\n```", 0)
        return writer

    def _build_wandb(self) -> None:
        wandb = _import_wandb()
        # The run id lives in the run directory so that a resumed run continues the same wandb run.
        id_path = self.run_dir / WANDB_ID_FILE
        if self.resume and id_path.exists():
            run_id = id_path.read_text(encoding="utf-8").strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # wandb's own id helper moved between releases
            id_path.write_text(run_id + "\n", encoding="utf-8")
        self._wandb = wandb
        self._wandb_run = wandb.init(
            project="sftune",
            dir=str(self.run_dir),
            config=self.config,
            name=self.run_name,
            id=run_id,
            resume="allow",
            mode=os.environ.get("WANDB_MODE"),
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append `{"step": step, **metrics, "time": unix}` to metrics.jsonl and forward it."""
        if not self.enabled:
            return
        if "step" in metrics or "time" in metrics:
            raise ValueError("metrics may not use the reserved keys 'step' and 'time'")
        values = {k: _json_value(v) for k, v in metrics.items()}
        row = {"step": int(step), **values, "time": round(time.time(), 3)}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(numbers, step=int(step))

    def log_text(
        self,
        step: int,
        name: str,
        rows: list[tuple[str, str]],
        extras: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        """Append generations (prompt, output) to samples.jsonl and forward them as a table;
        `extras[i]` adds keys to row i's line (a chat's whole conversation)."""
        if not self.enabled:
            return
        extras = extras or [{}] * len(rows)
        lines = [
            json.dumps({"step": int(step), "name": name, "prompt": p, "output": o, **extra})
            for (p, o), extra in zip(rows, extras, strict=True)
        ]
        with self.samples_path.open("a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        if self._tb is not None:
            self._tb.add_text(name, _markdown_table(rows), int(step))
        if self._wandb_run is not None:
            table = self._wandb.Table(columns=["prompt", "output"], data=[list(r) for r in rows])
            self._wandb_run.log({name: table}, step=int(step))

    def truncate_after(self, step: int, redo_evaluation: bool = False) -> None:
        """Keep only rows with step <= `step` (atomically), before a resumed run re-runs the rest.

        redo_evaluation: the resumed run evaluates at `step` itself again (it resumes at its
        last step, where the final validation comes after the checkpoint): that step's
        validation, task and sample rows go too, its training rows stay.
        """
        if not self.enabled:
            return

        def keep(row: dict, samples: bool) -> bool:
            at = row.get("step", 0)
            if at < step or (at == step and not redo_evaluation):
                return True
            evaluation = samples or "val_loss" in row or any(k.startswith("task") for k in row)
            return at == step and not evaluation

        for path, samples in ((self.metrics_path, False), (self.samples_path, True)):
            if path.exists():
                kept = [r for r in read_jsonl(path) if keep(r, samples)]
                atomic_write_lines(path, (json.dumps(r, allow_nan=False) for r in kept))
        if self._tb is not None:
            # TensorBoard hides events at or after purge_step that an earlier attempt wrote.
            self._tb.close()
            self._tb = self._build_tensorboard(purge_step=step + 1)

    def plot(self) -> Path | None:
        """Write `<run_dir>/learning_curve.png` from metrics.jsonl; None when there is no loss yet."""
        if not self.enabled:
            return None
        # Imported here: matplotlib loads only in runs that draw a curve. The curve reads rows
        # through metric_rows and never imports this module, so the dependency runs one way.
        from sftune.train.plot import plot_learning_curve

        return plot_learning_curve(
            read_metrics(self.run_dir),
            self.run_dir / CURVE_FILE,
            tokens_per_step=self.tokens_per_step,
            title=self.run_name,
        )

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _markdown_table(rows: list[tuple[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    body = "\n".join(f"| {cell(p)} | {cell(o)} |" for p, o in rows)
    return "| prompt | output |\n|---|---|\n" + body
