"""Divergence and bad numbers: a non-finite loss, gradient norm or weight stops a run with nothing
saved from it; loss spikes are flagged; NaN, infinities and out-of-range numbers are one-line
flag or config-file errors; an interrupted validation is run again on resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train import divergence, loop
from sftune.train.divergence import Diverged, LossSpikes
from sftune.train.metrics import read_metrics
from trainutil import tiny_config, train_args


def _main(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


def _error_line(code: int, text: str) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert code == 2, text
    assert text.count("sftune: error:") == 1 and "Traceback" not in text, text
    return next(line for line in text.splitlines() if line.startswith("sftune: error:"))


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "--lr must be a finite number, got nan"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
        ("--lr", "2e5", "--lr must be in [0, 1000], got 200000.0"),
        ("--grad-clip", "nan", "--grad-clip must be a finite number, got nan"),
        ("--beta1", "2", "--beta1 must be in [0, 1), got 2.0"),
        ("--beta2", "1", "--beta2 must be in [0, 1), got 1.0"),
        ("--eps", "-1", "--eps must be > 0, got -1.0"),
        ("--epochs", "inf", "--epochs must be a finite number, got inf"),
        ("--lora-dropout", "1", "--lora-dropout must be in [0, 1), got 1.0"),
        ("--seed", "-1", "--seed must be in [0, "),
        ("--max-new-tokens", "-1", "--max-new-tokens must be >= 1, got -1"),
        ("--max-steps", "inf", "max_steps: expected int, got 'inf'"),
    ],
)
def test_bad_numbers_are_flag_errors_before_anything_loads(tmp_path, capsys, flag, value, message):
    # No model or data exists: the flag is refused before either is looked at.
    args = train_args(tmp_path / "nothing", tmp_path / "run", flag, value)
    line = _error_line(*_main(args, capsys))
    assert message in line
    assert not (tmp_path / "run").exists()


def test_every_float_setting_must_be_finite_and_every_number_has_bounds():
    for name, (_, f) in config_mod.FIELDS.items():
        tp = config_mod._base_type(f.type)
        if tp in (int, float):
            assert f.metadata["bounds"], f"{name}: a number needs its bounds in its field"
        if tp is float:
            for bad in (math.nan, math.inf, -math.inf):
                with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be"):
                    config_mod.from_flat({name: bad})


def test_numbers_keep_their_meaning():
    cfg = config_mod.from_flat({"lr": 0, "grad_clip": 0, "beta1": 0, "eval_max_sequences": None})
    assert cfg.optim.lr == 0.0 and cfg.optim.grad_clip == 0.0  # a baseline run; clipping off
    with pytest.raises(ConfigError, match="lr: expected float, got True"):
        config_mod.from_flat({"lr": True})  # YAML's `lr: yes`
    with pytest.raises(ConfigError, match="--lora-r must be >= 1, got 0"):
        config_mod.from_flat({"lora_r": 0})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"lr: .nan\n", "bad.yaml: lr must be a finite number, got nan"),
        (b"optim:\n  beta1: 2\n", "bad.yaml: beta1 must be in [0, 1), got 2.0"),
        (b"max_steps: .inf\n", "bad.yaml: max_steps: expected int, got inf"),
        (b"lr: 1.0e-4\n# caf\xe9\n", "bad.yaml:2: not UTF-8 text (byte 16"),
        (b"lr: 1\x00\n", "bad.yaml: invalid YAML (unacceptable character #x0000"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "bad.yaml: invalid config file"),
        (b"optim: 3\n", "bad.yaml: optim: expected a mapping of optim settings"),
        (b"dtype: int8\n", "bad.yaml: dtype: 'int8' is not one of"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        config_mod.from_args(_namespace(config=str(path)))
    assert message in str(e.value) and "\n" not in str(e.value)


def _namespace(**values):
    import argparse

    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in values.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- spikes


def test_a_spike_is_far_above_the_recent_median():
    spikes = LossSpikes()
    assert spikes.check(10.8) is None  # nothing to compare the first step with
    assert spikes.check(1.9e7) == 10.8  # --lr 1e3's blow-up, at step 2
    spikes = LossSpikes()
    for loss in [2.0, 1.9, 1.8, 40.0, 1.7]:  # one outlier does not move the median
        spikes.check(loss)
    assert spikes.check(6.0) == 1.9  # over 3x the median
    assert spikes.check(5.8) is None  # under 3x the new median, 1.95
    low = LossSpikes()
    for loss in [0.02, 0.01, 0.02]:
        low.check(loss)
    assert low.check(0.5) is None  # 25x, but half a nat: not a spike near 0
    assert low.check(1.2) is not None
    lasting = LossSpikes()
    flagged = [lasting.check(loss) is not None for loss in [1.0] * 5 + [4.0] * 12]
    assert flagged == [False] * 5 + [True] * 5 + [False] * 7  # a lasting rise: the new trend


def test_a_huge_lr_warns_of_the_spike_in_the_console_and_the_metrics(workdir, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(workdir, run, "--lr", "1e3", "--max-steps", "2", "--eval-max-sequences", "8")
    code, text = _main(args, capsys)
    assert code == 0, text
    assert "step      2 | warning: loss spike" in text
    rows = {r["step"]: r for r in read_metrics(run) if "train_loss" in r}
    assert rows[2]["loss_spike"] is True and rows[2]["train_loss"] > 1e6
    assert "loss_spike" not in rows[1]


# ----------------------------------------------------------------------------- divergence


def _poisoned_train_step(monkeypatch, at_step: int, what: str):
    """train_step, except that at step `at_step` its weights, loss or grad norm go NaN."""
    real = loop.train_step
    calls = []

    def step(module, *args, **kw):
        loss, norm, counts, sums = real(module, *args, **kw)
        calls.append(1)
        if len(calls) == at_step:
            if what == "weights":
                with torch.no_grad():
                    next(module.parameters()).view(-1)[3] = math.nan
            elif what == "loss":
                loss = torch.full_like(loss, math.nan)
            else:
                norm = torch.full_like(norm, math.inf)
        return loss, norm, counts, sums

    monkeypatch.setattr(loop, "train_step", step)


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*"))


@pytest.mark.parametrize(
    "what, message, kept, good",
    [
        ("weights", "non-finite weights after step 3 (lm.model.embed_tokens.weight)", 2, 2),
        ("loss", "non-finite loss at step 3 (loss nan,", 2, 1),
        ("norm", "non-finite gradient norm at step 3 (loss ", 2, 1),
    ],
)
def test_divergence_stops_and_saves_nothing_of_it(
    workdir, tmp_path, capsys, monkeypatch, what, message, kept, good
):
    """Checkpoints every step; at step 3 the weights, the loss or the gradient norm go NaN:
    exit 2 with one line, no step-3 checkpoint, no final/, and the named checkpoint is the
    newest before the bad weights (a loss or norm of step 3 comes from step 2's weights)."""
    _poisoned_train_step(monkeypatch, 3, what)
    run = tmp_path / "run"
    extra = ["--max-steps", "5", "--save-every", "1", "--eval-max-sequences", "8"]
    line = _error_line(*_main(train_args(workdir, run, *extra), capsys))
    assert message in line, line
    assert _checkpoints(run) == [f"step_{s:08d}" for s in range(1, kept + 1)]
    assert not (run / "final").exists()
    assert f"the last good checkpoint is {run / 'checkpoints' / f'step_{good:08d}'}" in line
    if good < kept:
        assert f"step_{kept:08d} holds the weights that gave it" in line
    steps = [r["step"] for r in read_metrics(run) if "train_loss" in r]
    assert steps == [1, 2, 3] if what == "weights" else [1, 2]  # the curve up to it


def test_fp16_weights_that_go_nan_are_never_saved(workdir, tmp_path, capsys):
    """A real NaN, not a patched one: fp16 AdamW turns every untouched embedding row into 0/0
    (eps 1e-8 is 0 in fp16) at step 1; before, that run wrote NaN checkpoints and final/."""
    run = tmp_path / "run"
    extra = [
        "--dtype",
        "fp16",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--eval-max-sequences",
        "8",
    ]
    line = _error_line(*_main(train_args(workdir, run, *extra), capsys))
    assert "non-finite weights after step 1" in line and "there is no good checkpoint" in line
    assert "--dtype bf16" in line
    assert not (run / "checkpoints").exists() and not (run / "final").exists()


def test_the_weights_check_sees_every_trainable_tensor():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    assert divergence.nonfinite_parameters(lin, torch.device("cpu")) == []
    with torch.no_grad():
        lin[1].bias[0] = -math.inf
        lin[0].weight[1, 2] = math.nan
    assert divergence.nonfinite_parameters(lin, torch.device("cpu")) == ["0.weight", "1.bias"]
    lin[0].weight.requires_grad_(False)  # frozen (a LoRA base): training never changes it
    assert divergence.nonfinite_parameters(lin, torch.device("cpu")) == ["1.bias"]
    with pytest.raises(Diverged, match=r"after step 7 \(1.bias\)"):
        divergence.check_weights(lin, torch.device("cpu"), 7)


# ----------------------------------------------------------------------------- validation


def test_an_interrupted_validation_is_run_on_resume(workdir, tmp_path, monkeypatch):
    """The validation at step 2 is interrupted: the run saves step 2 and stops; the resumed run
    validates step 2 first, so the curve has the point, once, equal to an uninterrupted run's."""
    ref = loop.train(tiny_config(workdir, tmp_path / "ref", eval_every=2, eval_max_sequences=16))
    real, calls = loop.evaluate_pass, []

    def evaluate(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # step 0, then step 2: a SIGINT arrives during it
            kw["stop_requested"] = lambda: True
        return real(*args, **kw)

    monkeypatch.setattr(loop, "evaluate_pass", evaluate)
    cut = tmp_path / "cut"
    first = loop.train(tiny_config(workdir, cut, eval_every=2, eval_max_sequences=16))
    assert first.interrupted and first.steps == 2 and _checkpoints(cut) == ["step_00000002"]
    assert [r["step"] for r in read_metrics(cut) if "val_loss" in r] == [0]
    again = loop.train(
        tiny_config(workdir, cut, eval_every=2, eval_max_sequences=16, resume="latest")
    )
    assert not again.interrupted and again.steps == 4
    val = {r["step"]: r["val_loss"] for r in read_metrics(cut) if "val_loss" in r}
    assert [r["step"] for r in read_metrics(cut) if "val_loss" in r] == [0, 2, 4]
    assert val == {
        r["step"]: r["val_loss"] for r in read_metrics(ref.output_dir) if "val_loss" in r
    }
