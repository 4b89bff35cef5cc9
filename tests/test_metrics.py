"""MetricsLogger and read_metrics: metrics.jsonl, samples.jsonl, wandb / TensorBoard (fast, CPU,
no network)."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import types

import numpy as np
import pytest

from sftune.errors import ConfigError, SftuneError
from sftune.train.metrics import MetricsLogger, format_step_metrics, read_metrics


def _train_rows(logger, steps, tokens_per_step=None):
    for step in steps:
        metrics = {"train_loss": 3.0 / step + 0.1 * math.sin(step), "lr": 1e-4}
        if tokens_per_step:
            metrics["tokens"] = step * tokens_per_step
        logger.log(step, metrics)


def test_metrics_jsonl_lines_parse_and_carry_step(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    logger.log(1, {"train_loss": 2.5, "lr": 1e-4, "tokens": 4096, "epoch": 0.01})
    logger.log(2, {"train_loss": 2.25, "grad_norm": 0.75})
    logger.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == 2.5 and rows[0]["tokens"] == 4096
    assert all(isinstance(r["time"], float) for r in rows)
    assert list(rows[0])[0] == "step" and list(rows[0])[-1] == "time"
    assert read_metrics(tmp_path / "run") == rows


def test_non_finite_values_are_written_as_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(3, {"train_loss": float("nan"), "grad_norm": float("inf"), "lr": np.float32(2e-5)})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    row = json.loads(line)
    assert row["train_loss"] is None and row["grad_norm"] is None
    assert row["lr"] == pytest.approx(2e-5)


def test_reserved_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        MetricsLogger(tmp_path).log(1, {"step": 3.0})


def test_truncate_after_keeps_steps_up_to_resume_point(tmp_path):
    logger = MetricsLogger(tmp_path)
    _train_rows(logger, range(1, 11))
    logger.log_text(4, "samples", [("p", "o")])
    logger.log_text(8, "samples", [("p", "o")])
    logger.close()

    resumed = MetricsLogger(tmp_path, resume=True)
    resumed.truncate_after(5)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4]
    resumed.log(6, {"train_loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob(".*.tmp"))


def test_fresh_run_starts_new_files_and_resume_appends(tmp_path):
    MetricsLogger(tmp_path).log(1, {"train_loss": 1.0})
    MetricsLogger(tmp_path, resume=True).log(2, {"train_loss": 0.9})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    MetricsLogger(tmp_path).log(1, {"train_loss": 2.0})
    assert [r["train_loss"] for r in read_metrics(tmp_path)] == [2.0]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "tr')
    assert read_metrics(tmp_path) == [{"step": 1, "train_loss": 2.0}]
    assert read_metrics(tmp_path / "missing") == []


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False, report_to=["tensorboard", "wandb"])
    logger.log(1, {"train_loss": 1.0})
    logger.log_text(1, "samples", [("p", "o")])
    logger.truncate_after(0)
    assert logger.plot() is None
    logger.close()
    assert not run_dir.exists()


def test_non_main_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger = MetricsLogger(tmp_path / "run")
    logger.log(1, {"train_loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_log_text_writes_samples_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path)
    rows = [("Name a color.", "Blue."), ("Say | hi\nthere", "hi")]
    logger.log_text(7, "samples", rows)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    got = [json.loads(line) for line in lines]
    assert got == [
        {"step": 7, "name": "samples", "prompt": "Name a color.", "output": "Blue."},
        {"step": 7, "name": "samples", "prompt": "Say | hi\nthere", "output": "hi"},
    ]


def test_unknown_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="mlflow"):
        MetricsLogger(tmp_path, report_to=["mlflow"])
    MetricsLogger(tmp_path, report_to=["none"]).close()


def test_tensorboard_missing_raises_with_install_hint(tmp_path, monkeypatch):
    # None in sys.modules makes `import torch.utils.tensorboard` raise ImportError.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SftuneError, match=r"pip install 'sftune\[tensorboard\]'"):
        MetricsLogger(tmp_path, report_to=["tensorboard"])


def test_wandb_missing_raises_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SftuneError, match=r"pip install 'sftune\[wandb\]'"):
        MetricsLogger(tmp_path, report_to="wandb")


class _FakeWriter:
    instances: list[_FakeWriter] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.calls, self.closed = log_dir, purge_step, [], False
        _FakeWriter.instances.append(self)

    def add_scalar(self, *args):
        self.calls.append(("scalar", *args))

    def add_text(self, *args):
        self.calls.append(("text", *args))

    def close(self):
        self.closed = True


def test_tensorboard_receives_scalars_text_and_purge_step(tmp_path, monkeypatch):
    _FakeWriter.instances = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger = MetricsLogger(tmp_path, report_to=["tensorboard"], config={"lr": 1e-4})
    logger.log(3, {"train_loss": 1.5, "grad_norm": float("nan")})
    logger.log_text(3, "samples", [("p", "o")])
    logger.truncate_after(2)
    logger.close()
    first, second = _FakeWriter.instances
    assert first.log_dir == str(tmp_path / "tensorboard") and first.closed
    assert ("scalar", "train_loss", 1.5, 3) in first.calls
    assert not any(c[:2] == ("scalar", "grad_norm") for c in first.calls)  # null is skipped
    assert [c[1] for c in first.calls if c[0] == "text"] == ["config", "samples"]
    assert second.purge_step == 3 and second.closed


def test_wandb_receives_metrics_and_keeps_run_id_on_resume(tmp_path, monkeypatch):
    inits, logged = [], []

    class FakeRun:
        def log(self, data, step):
            logged.append((data, step))

        def finish(self):
            logged.append("finish")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or FakeRun()
    fake.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")

    logger = MetricsLogger(tmp_path, report_to=["wandb"], run_name="r", config={"a": 1})
    logger.log(5, {"train_loss": 1.25})
    logger.log_text(5, "samples", [("p", "o")])
    logger.close()
    assert inits[0]["project"] == "sftune" and inits[0]["mode"] == "offline"
    assert inits[0]["name"] == "r" and inits[0]["config"] == {"a": 1}
    run_id = inits[0]["id"]
    assert inits[0]["resume"] == "allow" and len(run_id) == 12
    assert logged[0] == ({"train_loss": 1.25}, 5)
    assert logged[1] == ({"samples": ("table", ["prompt", "output"], [["p", "o"]])}, 5)
    assert logged[2] == "finish"

    MetricsLogger(tmp_path, report_to=["wandb"], resume=True).close()
    assert inits[1]["id"] == run_id  # a resumed run continues the same wandb run
    MetricsLogger(tmp_path / "other", report_to=["wandb"]).close()
    assert inits[2]["id"] != run_id


def test_truncated_metrics_follow_the_umask(tmp_path):
    # The rewrite goes through a temporary file, whose 0600 must not replace the umask's mode.
    old = os.umask(0o022)
    try:
        logger = MetricsLogger(tmp_path)
        _train_rows(logger, range(1, 5))
        logger.truncate_after(2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.jsonl").stat().st_mode) == 0o644
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


DPO_TRAIN_ROW = {
    "train_loss": 0.6931,
    "rewards/chosen": 0.25,
    "rewards/rejected": -0.125,
    "rewards/accuracies": 0.625,
    "rewards/margins": 0.375,
    "logps/chosen": -41.5,
    "logps/rejected": -47.25,
    "grad_norm": 1.5,
    "lr": 1e-6,
}
DPO_VAL_ROW = {"val_loss": 0.65, "val_rewards/accuracies": 0.5, "val_rewards/margins": 0.125}


def test_preference_keys_reach_jsonl_tensorboard_and_wandb_unchanged(tmp_path, monkeypatch):
    """A "/" in a key is TensorBoard's and wandb's own grouping (a "rewards" section): the
    logger passes the keys through as they are, on train and validation rows alike."""
    _FakeWriter.instances = []
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = _FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    logged = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: types.SimpleNamespace(log=lambda d, step: logged.append((d, step)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    logger = MetricsLogger(tmp_path, report_to=["tensorboard", "wandb"])
    logger.log(4, DPO_TRAIN_ROW)
    logger.log(4, DPO_VAL_ROW)
    rows = read_metrics(tmp_path)
    assert [{k: v for k, v in r.items() if k not in ("step", "time")} for r in rows] == [
        DPO_TRAIN_ROW,
        DPO_VAL_ROW,
    ]
    (writer,) = _FakeWriter.instances
    scalars = [c[1:] for c in writer.calls if c[0] == "scalar"]
    expected = [(k, v, 4) for row in (DPO_TRAIN_ROW, DPO_VAL_ROW) for k, v in row.items()]
    assert scalars == expected
    assert logged == [(DPO_TRAIN_ROW, 4), (DPO_VAL_ROW, 4)]


def test_resume_redoes_a_preference_validation_row(tmp_path):
    # A DPO validation row carries val_loss, so a resumed run's redone evaluation replaces it.
    logger = MetricsLogger(tmp_path)
    logger.log(4, DPO_TRAIN_ROW)
    logger.log(4, DPO_VAL_ROW)
    logger.truncate_after(4, redo_evaluation=True)
    assert [set(r) - {"step", "time"} for r in read_metrics(tmp_path)] == [set(DPO_TRAIN_ROW)]


def test_format_step_metrics_for_console_lines():
    assert format_step_metrics(DPO_TRAIN_ROW) == "acc 0.62 | margin 0.38"
    assert format_step_metrics(DPO_VAL_ROW) == "val_acc 0.50 | val_margin 0.12"
    assert format_step_metrics({"rewards/accuracies": 1, "rewards/margins": -2.5}) == (
        "acc 1.00 | margin -2.50"
    )
    # An SFT row has none; a null (non-finite) value is left out rather than printed.
    assert format_step_metrics({"train_loss": 1.5, "grad_norm": 1.0}) == ""
    assert format_step_metrics({"rewards/accuracies": None, "rewards/margins": 0.5}) == (
        "margin 0.50"
    )
