"""The learning curve: what draw_learning_curve puts on the Figure, and the PNG that
plot_learning_curve / MetricsLogger.plot write (fast, CPU, no pyplot)."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys

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


def _dpo_rows(steps=40, val_every=10, tokens_per_step=3000):
    """metrics.jsonl rows as a DPO run logs them: step 0 validates before training (the policy is
    the reference: loss ln 2, margin 0, accuracy 0), then a train row per step and a validation
    row every `val_every` steps."""
    rows = [
        {"step": 0, "val_loss": math.log(2), "val_rewards/accuracies": 0.0}
        | {"val_rewards/margins": 0.0, "tokens": 0}
    ]
    for s in range(1, steps + 1):
        acc, margin = min(1.0, s / steps), 0.05 * s
        rows.append(
            {"step": s, "train_loss": math.log(2) - 0.01 * s, "rewards/chosen": margin / 2}
            | {"rewards/rejected": -margin / 2, "rewards/accuracies": acc}
            | {"rewards/margins": margin, "logps/chosen": -40.0, "logps/rejected": -45.0}
            | {"grad_norm": 1.0, "lr": 1e-6, "tokens": s * tokens_per_step}
        )
        if s % val_every == 0:
            rows.append(
                {"step": s, "val_loss": 0.6, "val_rewards/accuracies": acc / 2}
                | {"val_rewards/margins": margin / 2, "tokens": s * tokens_per_step}
            )
    return rows


def _series(rows, key):
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


def test_preference_run_adds_reward_accuracy_and_margin_panels():
    rows = _dpo_rows()
    fig = draw_learning_curve(rows, title="dpo")
    titles = ["", "reward accuracy (chosen > rejected)", "reward margin (chosen - rejected)"]
    assert [ax.get_title() for ax in fig.axes] == titles * 2
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "reward accuracy", "reward margin"] * 2
    assert [ax.get_xlabel() for ax in fig.axes] == ["optimizer step"] * 3 + ["tokens"] * 3
    loss, accuracy, margin = fig.axes[:3]

    lines = _lines(accuracy)
    assert list(lines) == ["train (raw)", "train (smoothed)", "validation"]
    assert _xy(lines["train (raw)"]) == _series(rows, "rewards/accuracies")
    assert _xy(lines["validation"]) == _series(rows, "val_rewards/accuracies")
    assert _xy(lines["validation"])[1][0] == 0.0  # step 0: a tie is not a correct pair
    assert accuracy.get_ylim() == (-0.02, 1.02)

    lines = _lines(margin)
    assert _xy(lines["train (raw)"]) == _series(rows, "rewards/margins")
    assert _xy(lines["validation"]) == _series(rows, "val_rewards/margins")
    assert _xy(lines["validation"])[1][0] == 0.0

    assert _xy(_lines(loss)["validation"]) == _series(rows, "val_loss")
    by_tokens = _lines(fig.axes[4])  # the margin against tokens
    assert list(by_tokens["train (raw)"].get_xdata()) == [s * 3000 for s in range(1, 41)]
    assert fig.get_suptitle() == (
        "dpo: final val loss 0.6000 (step 40); val reward accuracy 0.5000 (step 40)"
    )


def test_preference_panels_sit_between_loss_and_tasks():
    rows = _dpo_rows(steps=4, val_every=2)
    rows += [{"step": 4, "task/gsm8k/exact_match/strict-match": 0.25}]
    fig = draw_learning_curve(rows)
    ylabels = ["loss", "reward accuracy", "reward margin", "task accuracy"]
    assert [ax.get_ylabel() for ax in fig.axes] == ylabels * 2
    assert fig.get_suptitle() == (
        "final val loss 0.6000 (step 4); val reward accuracy 0.5000 (step 4); "
        "gsm8k exact_match (strict-match) 0.2500 (step 4)"
    )


def test_train_only_preference_run_titles_the_train_accuracy():
    rows = [r for r in _dpo_rows(steps=5) if "train_loss" in r]
    fig = draw_learning_curve(rows)
    assert "validation" not in _lines(fig.axes[1])
    assert fig.get_suptitle() == "final train loss 0.6431 (step 5); reward accuracy 1.0000 (step 5)"


def test_sft_figure_has_no_reward_panel():
    rows = [{"step": s, "train_loss": 3.0 / s, "grad_norm": 1.0, "tokens": s * 512} for s in (1, 2)]
    rows.append({"step": 2, "val_loss": 1.5, "tokens": 1024})
    fig = draw_learning_curve(rows)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "loss"]
    assert [ax.get_title() for ax in fig.axes] == ["", ""]
    assert fig.get_size_inches().tolist() == [8.0, 8.0]
    assert fig.get_suptitle() == "final val loss 1.5000 (step 2)"


def test_logger_draws_the_preference_curve(tmp_path):
    logger = MetricsLogger(tmp_path, run_name="dpo")
    for row in _dpo_rows(steps=12, val_every=6):
        logger.log(row.pop("step"), row)
    _assert_png(logger.plot())


def _fresh_import(module: str) -> set[str]:
    """The modules (of interest here) that importing `module` alone loads, in a new interpreter."""
    code = (
        f"import sys, {module}\n"
        "wanted = ('sftune.train.metrics', 'sftune.train.plot', 'matplotlib', 'torch')\n"
        "print(' '.join(m for m in wanted if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_plot_and_metrics_do_not_import_each_other():
    # The curve reads rows through metric_rows; the logger loads the curve only to draw it.
    assert "sftune.train.metrics" not in _fresh_import("sftune.train.plot")
    assert not {"sftune.train.plot", "matplotlib"} & _fresh_import("sftune.train.metrics")
    # What both read rows with costs neither the logger, the curve, matplotlib nor torch.
    assert _fresh_import("sftune.train.metric_rows") == set()
