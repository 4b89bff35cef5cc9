"""Run metrics: a JSON-lines file, optional wandb / TensorBoard, a learning-curve PNG, a console bar.

Everything a run measures goes through one `MetricsLogger`, which writes only on the main
process (rank 0) and costs nothing when disabled:

    logger = MetricsLogger("runs/alpaca", report_to=["tensorboard"], tokens_per_step=65536)
    logger.log(step, {"train_loss": 1.93, "lr": 2e-5, "tokens": 65536 * step})
    logger.log_text(step, "samples", [("Name three colors.", "Red, green and blue.")])
    logger.plot()    # runs/alpaca/learning_curve.png
    logger.close()

Files in the run directory:

    metrics.jsonl        {"step": 10, "train_loss": 1.93, "lr": 2e-05, ..., "time": 1718000000.0}
    samples.jsonl        {"step": 10, "name": "samples", "prompt": "...", "output": "..."}
    learning_curve.png   train/val loss against optimizer steps and against tokens
    tensorboard/         only with report_to=["tensorboard"]  (pip install 'sftune[tensorboard]')
    wandb/, wandb_id.txt only with report_to=["wandb"]        (pip install 'sftune[wandb]')

Non-finite numbers are written as null so every line stays valid JSON. On resume the trainer
calls `truncate_after(step)` so that steps logged after the last checkpoint, and about to be
re-run, are not duplicated.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sftune.errors import ConfigError, SftuneError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "learning_curve.png"
WANDB_ID_FILE = "wandb_id.txt"
REPORT_TO = ("wandb", "tensorboard")
# Short names for the progress bar's postfix (keyword arguments cannot contain "/").
_POSTFIX_NAMES = {"train_loss": "loss", "tokens_per_s": "tok/s", "tok_s": "tok/s"}


def _is_main_process() -> bool:
    # A safety net for callers that forget to pass enabled=is_main: torchrun sets RANK.
    return int(os.environ.get("RANK", "0")) == 0


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: tensors and numpy scalars become Python numbers, NaN/inf become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise SftuneError(f"{path}:{i + 1}: not valid JSON ({err})") from None
    return rows


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    """Replace `path` with `lines` so that a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of `<run_dir>/metrics.jsonl` in order ([] when there is none); null stays None."""
    return _read_jsonl(Path(run_dir) / METRICS_FILE)


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
        self.enabled = enabled and _is_main_process()
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

    def log_text(self, step: int, name: str, rows: list[tuple[str, str]]) -> None:
        """Append generations (prompt, output) to samples.jsonl and forward them as a table."""
        if not self.enabled:
            return
        lines = [
            json.dumps({"step": int(step), "name": name, "prompt": p, "output": o}) for p, o in rows
        ]
        with self.samples_path.open("a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        if self._tb is not None:
            self._tb.add_text(name, _markdown_table(rows), int(step))
        if self._wandb_run is not None:
            table = self._wandb.Table(columns=["prompt", "output"], data=[list(r) for r in rows])
            self._wandb_run.log({name: table}, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (atomically), before a resumed run re-runs the rest."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
                _write_atomic(path, (json.dumps(r, allow_nan=False) for r in kept))
        if self._tb is not None:
            # TensorBoard hides events at or after purge_step that an earlier attempt wrote.
            self._tb.close()
            self._tb = self._build_tensorboard(purge_step=step + 1)

    def plot(self) -> Path | None:
        """Write `<run_dir>/learning_curve.png` from metrics.jsonl; None when there is no loss yet."""
        if not self.enabled:
            return None
        return plot_learning_curve(
            self.run_dir, tokens_per_step=self.tokens_per_step, title=self.run_name
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


def _smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it), stronger for longer runs."""
    beta = min(0.95, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def _loss_points(rows: list[dict], key: str, x_of) -> tuple[list[float], list[float]]:
    points = [(x_of(r), r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    points = [(x, y) for x, y in points if x is not None]
    return [x for x, _ in points], [y for _, y in points]


def _draw_losses(ax, rows: list[dict], x_of, xlabel: str) -> None:
    tx, ty = _loss_points(rows, "train_loss", x_of)
    vx, vy = _loss_points(rows, "val_loss", x_of)
    if tx:
        ax.plot(tx, ty, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (raw)")
        ax.plot(tx, _smooth(ty), color="tab:blue", linewidth=1.8, label="train (smoothed)")
    if vx:
        ax.plot(vx, vy, color="tab:orange", marker="o", linewidth=1.2, label="validation")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")


def plot_learning_curve(
    run_dir: str | Path, *, tokens_per_step: int | None = None, title: str | None = None
) -> Path | None:
    """Draw train (raw + smoothed) and validation loss against steps and against tokens.

    Tokens come from each row's `tokens` key, else step * tokens_per_step; without either the
    tokens panel is left out. Uses Figure + FigureCanvasAgg, never pyplot, so the process's
    matplotlib backend is left alone. Returns the PNG path, or None when no loss was logged.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir) if "step" in r]
    has_loss = any(
        isinstance(r.get(k), (int, float)) for r in rows for k in ("train_loss", "val_loss")
    )
    if not has_loss:
        return None

    def tokens_of(row: dict) -> float | None:
        if isinstance(row.get("tokens"), (int, float)):
            return row["tokens"]
        return row["step"] * tokens_per_step if tokens_per_step else None

    with_tokens = any(tokens_of(r) is not None for r in rows)
    fig = Figure(figsize=(8, 8 if with_tokens else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if with_tokens else 1, 1, squeeze=False)[:, 0]
    _draw_losses(axes[0], rows, lambda r: r["step"], "optimizer step")
    if with_tokens:
        _draw_losses(axes[1], rows, tokens_of, "tokens")
        axes[1].xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than an offset of 1e6
    fig.suptitle(_curve_title(rows, title))

    out = run_dir / CURVE_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{CURVE_FILE}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _curve_title(rows: list[dict], name: str | None) -> str:
    val = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    train = [r for r in rows if isinstance(r.get("train_loss"), (int, float))]
    if val:
        summary = f"final val loss {val[-1]['val_loss']:.4f} (step {val[-1]['step']})"
    else:
        summary = f"final train loss {train[-1]['train_loss']:.4f} (step {train[-1]['step']})"
    return f"{name}: {summary}" if name else summary


class ConsoleProgress:
    """A tqdm bar over optimizer steps with loss / lr / tok/s and an ETA.

        bar = ConsoleProgress(total_steps=1000, initial=resumed_step, enabled=is_main)
        bar.update(train_loss=1.93, lr=2e-5, tokens_per_s=41000)
        bar.write("saved checkpoint step 500")    # a line that does not break the bar
        bar.close()

    When stderr is not a terminal (CI, a log file) the bar redraws at most every 5 s so the
    log is not flooded; when disabled nothing is printed at all.
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self.enabled = enabled and _is_main_process()
        self._bar = None
        if not self.enabled:
            return
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self._bar = tqdm(
            total=total_steps,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if tty else 5.0,
            file=sys.stderr,
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            shown = {_POSTFIX_NAMES.get(k, k): _short(v) for k, v in postfix.items()}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def write(self, msg: str) -> None:
        if self._bar is None:
            return
        self._bar.write(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(value: Any) -> str:
    value = _json_value(value)
    if isinstance(value, float):
        if 0 < abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
