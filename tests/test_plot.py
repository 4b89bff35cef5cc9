"""The learning curve: what draw_learning_curve puts on the Figure, and the PNG that
plot_learning_curve / MetricsLogger.plot write (fast, CPU, no pyplot)."""

from __future__ import annotations

import math
import os
import stat

import pytest

from sftune.train.metrics import CURVE_FILE, MetricsLogger, read_metrics
from sftune.train.plot import draw_learning_curve, plot_learning_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024


def _train_rows(logger, steps, tokens_per_step=None):
    for step in steps:
        metrics = {"train_loss": 3.0 / step + 0.1 * math.sin(step), "lr": 1e-4}
        if tokens_per_step:
            metrics["tokens"] = step * tokens_per_step
        logger.log(step, metrics)


def _lines(ax) -> dict:
    """The axes' series by label, after checking that the legend names the same ones."""
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    return lines


def _xy(line) -> tuple[list, list]:
    return list(line.get_xdata()), list(line.get_ydata())


def test_plot_with_train_rows_only(tmp_path):
    logger = MetricsLogger(tmp_path, tokens_per_step=2048)
    _train_rows(logger, range(1, 60))
    path = logger.plot()
    assert path == tmp_path / "learning_curve.png"
    _assert_png(path)
    assert not list(tmp_path.glob(".learning_curve.png.*"))


def test_plot_with_train_and_val_rows(tmp_path):
    logger = MetricsLogger(tmp_path, run_name="tiny")
    _train_rows(logger, range(1, 200), tokens_per_step=512)
    for step in (50, 100, 150, 199):
        logger.log(step, {"val_loss": 2.0 - step / 200, "tokens": step * 512})
    logger.log(200, {"train_loss": float("nan")})  # a null loss is skipped, not drawn
    _assert_png(logger.plot())
    # Replaced in place, atomically, on every call.
    _assert_png(logger.plot())


def test_plot_without_tokens_draws_the_step_panel_only(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(10, {"val_loss": 1.5})
    _assert_png(logger.plot())


def test_plot_with_zero_rows_returns_none(tmp_path):
    logger = MetricsLogger(tmp_path)
    assert logger.plot() is None
    logger.log(1, {"lr": 1e-4})  # rows, but no loss yet
    assert logger.plot() is None
    assert not (tmp_path / "learning_curve.png").exists()


def test_plot_leaves_pyplot_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train_loss": 1.0})
    logger.plot()
    assert matplotlib.get_backend() == before


def test_figure_holds_the_logged_train_and_validation_series():
    train = {s: 3.0 / s for s in range(1, 41)}
    val = {10: 2.5, 20: 2.0, 40: 1.25}
    rows = [{"step": s, "train_loss": y, "tokens": s * 512} for s, y in train.items()]
    rows += [{"step": s, "val_loss": y, "tokens": s * 512} for s, y in val.items()]
    rows.append({"step": 41, "train_loss": None})  # a non-finite loss, logged as null
    fig = draw_learning_curve(rows, title="tiny")

    by_step, by_tokens = fig.axes
    assert by_step.get_xlabel() == "optimizer step" and by_tokens.get_xlabel() == "tokens"
    lines = _lines(by_step)
    assert list(lines) == ["train (raw)", "train (smoothed)", "validation"]
    assert _xy(lines["train (raw)"]) == (list(train), list(train.values()))
    assert _xy(lines["validation"]) == (list(val), list(val.values()))
    assert list(lines["train (smoothed)"].get_xdata()) == list(train)

    lines = _lines(by_tokens)
    assert _xy(lines["train (raw)"]) == ([s * 512 for s in train], list(train.values()))
    assert _xy(lines["validation"]) == ([s * 512 for s in val], list(val.values()))
    assert fig.get_suptitle() == "tiny: final val loss 1.2500 (step 40)"


def test_smoothed_train_loss_is_debiased_and_smoother():
    flat = draw_learning_curve([{"step": s, "train_loss": 2.0} for s in range(1, 101)])
    smoothed = _lines(flat.axes[0])["train (smoothed)"].get_ydata()
    # Debiased: the average starts at the first value rather than climbing from zero.
    assert list(smoothed) == pytest.approx([2.0] * 100)

    noisy = [{"step": s, "train_loss": 2.0 + (-1) ** s} for s in range(1, 201)]
    lines = _lines(draw_learning_curve(noisy).axes[0])
    raw, smoothed = (lines[k].get_ydata() for k in ("train (raw)", "train (smoothed)"))
    assert max(smoothed[100:]) - min(smoothed[100:]) < 0.2 * (max(raw) - min(raw))


def test_tokens_panel_from_tokens_per_step_or_left_out():
    rows = [{"step": s, "train_loss": 1.0 / s} for s in (1, 2, 3)]
    fig = draw_learning_curve(rows, tokens_per_step=1000)
    assert len(fig.axes) == 2
    assert list(_lines(fig.axes[1])["train (raw)"].get_xdata()) == [1000, 2000, 3000]
    assert "validation" not in _lines(fig.axes[0])

    fig = draw_learning_curve(rows)
    assert len(fig.axes) == 1
    assert fig.get_suptitle() == "final train loss 0.3333 (step 3)"


def test_draw_without_loss_returns_none():
    assert draw_learning_curve([]) is None
    assert draw_learning_curve([{"step": 1, "lr": 1e-4}, {"step": 2, "train_loss": None}]) is None
    assert draw_learning_curve([{"train_loss": 1.0}]) is None  # rows without a step are skipped


def test_png_follows_the_umask(tmp_path):
    # Written through a temporary file, whose 0600 must not leak into the shared run directory.
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train_loss": 1.0})
    old = os.umask(0o022)
    try:
        path = plot_learning_curve(read_metrics(tmp_path), tmp_path / CURVE_FILE)
    finally:
        os.umask(old)
    assert path == tmp_path / "learning_curve.png"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
