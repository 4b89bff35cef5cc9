"""The learning curve: train (raw + smoothed) and validation loss against steps and tokens;
beside them, for a preference run (dpo, ipo, simpo, orpo), the reward accuracy and margin; and
when the run scored lm-eval tasks, their accuracy.

    rows = read_metrics("runs/alpaca")                          # sftune.train.metric_rows
    plot_learning_curve(rows, "runs/alpaca/learning_curve.png", tokens_per_step=65536)
    fig = draw_learning_curve(rows)                             # the Figure itself, no file

Drawing is split from writing so that what the curve shows (which series, which values, the
title) can be checked on the Figure's artists rather than on PNG bytes. Uses Figure +
FigureCanvasAgg, never pyplot, so the process's matplotlib backend (a notebook's inline one,
say) is left alone and no global figure registry fills up over a long run. Rows are read
through sftune.train.metric_rows, never through the logger (sftune.train.metrics), which
imports this module to draw: the dependency runs one way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from sftune.files import atomic_path
from sftune.train.metric_rows import (
    REWARD_ACCURACY,
    REWARD_MARGIN,
    VAL_PREFIX,
    has_rewards,
    is_number,
    task_curves,
    task_label,
    task_stderr_key,
)

XOf = Callable[[dict], float | None]  # a row -> its x (step or tokens), None to skip it
Draw = Callable[..., None]  # (ax, rows, x_of): one panel of one row of the figure

VAL_ACCURACY, VAL_MARGIN = VAL_PREFIX + REWARD_ACCURACY, VAL_PREFIX + REWARD_MARGIN


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

    Columns, left to right: the loss; for a preference run (any rewards/* or val_rewards/*
    key) the reward accuracy (0..1) and the reward margin, train and validation; with task
    metrics (task/<task>/<metric>[/<filter>], from lm-eval) each metric, its standard error
    as a band. The first row of axes is against optimizer steps; a second row is against
    tokens, taken from each row's `tokens` key, else step * tokens_per_step, and is left out
    without either. The title names the final validation loss (else the final train loss),
    the last reward accuracy and the last value of the first task metric. None when no row
    holds a train or validation loss.
    """
    rows = [r for r in rows if "step" in r]
    if not any(is_number(r.get(k)) for r in rows for k in ("train_loss", "val_loss")):
        return None
    tokens_of = _tokens_of(tokens_per_step)
    with_tokens = any(tokens_of(r) is not None for r in rows)
    panels: list[tuple[Draw, float]] = [(_draw_losses, 8.0)]  # (how to draw it, its width)
    if has_rewards(rows):
        panels += [(_draw_reward_accuracy, 6.0), (_draw_reward_margin, 6.0)]
    if task_curves(rows):
        panels.append((_draw_tasks, 8.0))
    widths = [width for _, width in panels]
    fig = Figure(figsize=(sum(widths), 8 if with_tokens else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    xs = [(lambda r: r["step"], "optimizer step"), (tokens_of, "tokens")][: 1 + with_tokens]
    axes = fig.subplots(len(xs), len(panels), squeeze=False, width_ratios=widths)
    for i, (x_of, xlabel) in enumerate(xs):
        for j, (draw, _) in enumerate(panels):
            draw(axes[i, j], rows, x_of)
            axes[i, j].set_xlabel(xlabel)
            axes[i, j].grid(True, alpha=0.3)
    if with_tokens:
        for ax in axes[1]:
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than an offset of 1e6
    fig.suptitle(_curve_title(rows, title))
    return fig


def _tokens_of(tokens_per_step: int | None) -> XOf:
    def tokens_of(row: dict) -> float | None:
        if is_number(row.get("tokens")):
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


def _points(rows: list[dict], key: str, x_of: XOf) -> tuple[list[float], list[float]]:
    # null (a non-finite value) and missing keys are skipped rather than drawn.
    points = [(x_of(r), r[key]) for r in rows if is_number(r.get(key))]
    points = [(x, y) for x, y in points if x is not None]
    return [x for x, _ in points], [y for _, y in points]


def _draw_series(ax, rows: list[dict], x_of: XOf, train_key: str, val_key: str) -> None:
    """A train metric, raw and smoothed (it is logged every step), and its validation points."""
    tx, ty = _points(rows, train_key, x_of)
    vx, vy = _points(rows, val_key, x_of)
    if tx:
        ax.plot(tx, ty, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (raw)")
        ax.plot(tx, _smooth(ty), color="tab:blue", linewidth=1.8, label="train (smoothed)")
    if vx:
        ax.plot(vx, vy, color="tab:orange", marker="o", linewidth=1.2, label="validation")


def _draw_losses(ax, rows: list[dict], x_of: XOf) -> None:
    _draw_series(ax, rows, x_of, "train_loss", "val_loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize="small")


def _draw_reward_accuracy(ax, rows: list[dict], x_of: XOf) -> None:
    """The share of pairs whose chosen reward beats the rejected one; a tie (step 0, where the
    policy is the reference) counts as wrong, so the curve starts at 0."""
    _draw_series(ax, rows, x_of, REWARD_ACCURACY, VAL_ACCURACY)
    ax.set_title("reward accuracy (chosen > rejected)")
    ax.set_ylabel("reward accuracy")
    ax.set_ylim(-0.02, 1.02)  # 0..1, with the points at 0 (step 0) and 1 not cut in half
    if ax.get_lines():  # a run that logged other rewards/* keys only: an empty panel, no legend
        ax.legend(loc="lower right", fontsize="small")


def _draw_reward_margin(ax, rows: list[dict], x_of: XOf) -> None:
    """The mean of chosen minus rejected reward over a step's pairs (0 at step 0)."""
    _draw_series(ax, rows, x_of, REWARD_MARGIN, VAL_MARGIN)
    ax.set_title("reward margin (chosen - rejected)")
    ax.set_ylabel("reward margin")
    if ax.get_lines():
        ax.legend(loc="upper left", fontsize="small")


def _draw_tasks(ax, rows: list[dict], x_of: XOf) -> None:
    """Each task metric (lm-eval's, logged as task/...) with its standard error as a band."""
    for key in task_curves(rows):
        err_key = task_stderr_key(key)
        points = [(x_of(r), r[key], r.get(err_key)) for r in rows if is_number(r.get(key))]
        points = [p for p in points if p[0] is not None]
        x = [p[0] for p in points]
        y = [p[1] for p in points]
        (line,) = ax.plot(x, y, marker="o", linewidth=1.2, label=task_label(key))
        if all(is_number(p[2]) for p in points):
            low = [v - e for _, v, e in points]
            high = [v + e for _, v, e in points]
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    if all(v >= 0 for points in task_curves(rows).values() for _, v in points):
        ax.set_ylim(bottom=0)  # accuracies: no axis below 0 when every value is 0
    ax.set_ylabel("task accuracy")
    ax.legend(loc="upper left", fontsize="small")


def _last(rows: list[dict], key: str) -> dict | None:
    return next((r for r in reversed(rows) if is_number(r.get(key))), None)


def _curve_title(rows: list[dict], name: str | None) -> str:
    val, train = _last(rows, "val_loss"), _last(rows, "train_loss")
    if val:
        summary = f"final val loss {val['val_loss']:.4f} (step {val['step']})"
    else:
        summary = f"final train loss {train['train_loss']:.4f} (step {train['step']})"
    for key, what in ((VAL_ACCURACY, "val reward accuracy"), (REWARD_ACCURACY, "reward accuracy")):
        if row := _last(rows, key):
            summary += f"; {what} {row[key]:.4f} (step {row['step']})"
            break
    curves = task_curves(rows)
    if curves:
        key, points = next(iter(curves.items()))
        summary += f"; {task_label(key)} {points[-1][1]:.4f} (step {points[-1][0]})"
    return f"{name}: {summary}" if name else summary
