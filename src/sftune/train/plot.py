"""The learning curve: train (raw + smoothed) and validation loss against steps and tokens, and
beside them, when the run scored lm-eval tasks, their accuracy against steps and tokens.

    rows = read_metrics("runs/alpaca")                          # sftune.train.metrics
    plot_learning_curve(rows, "runs/alpaca/learning_curve.png", tokens_per_step=65536)
    fig = draw_learning_curve(rows)                             # the Figure itself, no file

Drawing is split from writing so that what the curve shows (which series, which values, the
title) can be checked on the Figure's artists rather than on PNG bytes. Uses Figure +
FigureCanvasAgg, never pyplot, so the process's matplotlib backend (a notebook's inline one,
say) is left alone and no global figure registry fills up over a long run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from sftune.files import atomic_path
from sftune.train.metrics import task_curves, task_label, task_stderr_key

XOf = Callable[[dict], float | None]  # a row -> its x (step or tokens), None to skip it


def plot_learning_curve(
    rows: list[dict],
    out: str | Path,
    *,
    tokens_per_step: int | None = None,
    title: str | None = None,
) -> Path | None:
    """Write the learning curve of metrics `rows` to the PNG `out`; None when no loss was logged.

    The PNG is replaced atomically, so a viewer refreshing it mid-run never sees half a file.
    """
    fig = draw_learning_curve(rows, tokens_per_step=tokens_per_step, title=title)
    if fig is None:
        return None
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out


def draw_learning_curve(
    rows: list[dict], *, tokens_per_step: int | None = None, title: str | None = None
) -> Figure | None:
    """The learning-curve Figure for metrics rows (as `read_metrics` returns them).

    The first axes plot loss against optimizer steps; a second plots it against tokens, taken
    from each row's `tokens` key, else step * tokens_per_step, and is left out without either.
    Rows with task metrics (task/<task>/<metric>[/<filter>], from lm-eval) add a column beside
    the losses: each metric against steps (and tokens), its standard error as a band. The
    title names the final validation loss (else the final train loss) and the last value of
    the first task metric. None when no row holds a train or validation loss.
    """
    rows = [r for r in rows if "step" in r]
    if not any(_is_number(r.get(k)) for r in rows for k in ("train_loss", "val_loss")):
        return None
    tokens_of = _tokens_of(tokens_per_step)
    with_tokens = any(tokens_of(r) is not None for r in rows)
    with_tasks = bool(task_curves(rows))
    nrows, ncols = 2 if with_tokens else 1, 2 if with_tasks else 1
    fig = Figure(figsize=(8 * ncols, 8 if with_tokens else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    xs = [(lambda r: r["step"], "optimizer step"), (tokens_of, "tokens")][:nrows]
    for i, (x_of, xlabel) in enumerate(xs):
        _draw_losses(axes[i, 0], rows, x_of, xlabel)
        if with_tasks:
            _draw_tasks(axes[i, 1], rows, x_of, xlabel)
    if with_tokens:
        for ax in axes[1]:
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than an offset of 1e6
    fig.suptitle(_curve_title(rows, title))
    return fig


def _is_number(value: object) -> bool:
    # null (a non-finite loss) and missing keys are skipped rather than drawn.
    return isinstance(value, (int, float))


def _tokens_of(tokens_per_step: int | None) -> XOf:
    def tokens_of(row: dict) -> float | None:
        if _is_number(row.get("tokens")):
            return row["tokens"]
        return row["step"] * tokens_per_step if tokens_per_step else None

    return tokens_of


def _smooth(values: list[float]) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it), stronger for longer runs."""
    beta = min(0.95, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta > 0 else v)
    return out


def _loss_points(rows: list[dict], key: str, x_of: XOf) -> tuple[list[float], list[float]]:
    points = [(x_of(r), r[key]) for r in rows if _is_number(r.get(key))]
    points = [(x, y) for x, y in points if x is not None]
    return [x for x, _ in points], [y for _, y in points]


def _draw_losses(ax, rows: list[dict], x_of: XOf, xlabel: str) -> None:
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


def _draw_tasks(ax, rows: list[dict], x_of: XOf, xlabel: str) -> None:
    """Each task metric (lm-eval's, logged as task/...) with its standard error as a band."""
    for key in task_curves(rows):
        err_key = task_stderr_key(key)
        points = [(x_of(r), r[key], r.get(err_key)) for r in rows if _is_number(r.get(key))]
        points = [p for p in points if p[0] is not None]
        x = [p[0] for p in points]
        y = [p[1] for p in points]
        (line,) = ax.plot(x, y, marker="o", linewidth=1.2, label=task_label(key))
        if all(_is_number(p[2]) for p in points):
            low = [v - e for _, v, e in points]
            high = [v + e for _, v, e in points]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    if all(v >= 0 for points in task_curves(rows).values() for _, v in points):
        ax.set_ylim(bottom=0)  # accuracies: no axis below 0 when every value is 0
    ax.set_xlabel(xlabel)
    ax.set_ylabel("task accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")


def _curve_title(rows: list[dict], name: str | None) -> str:
    val = [r for r in rows if _is_number(r.get("val_loss"))]
    train = [r for r in rows if _is_number(r.get("train_loss"))]
    if val:
        summary = f"final val loss {val[-1]['val_loss']:.4f} (step {val[-1]['step']})"
    else:
        summary = f"final train loss {train[-1]['train_loss']:.4f} (step {train[-1]['step']})"
    curves = task_curves(rows)
    if curves:
        key, points = next(iter(curves.items()))
        summary += f"; {task_label(key)} {points[-1][1]:.4f} (step {points[-1][0]})"
    return f"{name}: {summary}" if name else summary
