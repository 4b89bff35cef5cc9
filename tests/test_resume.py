"""`--resume` continues the saved run as it was: the interrupt's hint, used as printed, resumes;
only steps, cadence and layout may change (applied and said); anything else, or a data file
whose bytes changed, is one line and exit 2 with the run directory untouched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train import loop
from sftune.train.metrics import read_metrics
from trainutil import FP64, losses, train_args, weights

LORA = ("--lora", "--lora-r", "4", "--lora-targets", "q_proj,v_proj")


def _args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return train_args(workdir, out, "--micro-batch-size", "4", *FP64, *extra)


def _main(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


def _snapshot(run: Path) -> dict[str, str]:
    """Every file under `run` (dot-files too) by its bytes and modification time."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        + str(p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def _interrupt_after(monkeypatch, step: int) -> None:
    """SIGINT to this process after training step `step`, as a Ctrl-C would."""
    real, calls = loop.train_step, []

    def train_step(*a, **kw):
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop, "train_step", train_step)


@pytest.mark.parametrize("kind", [LORA, ()], ids=["lora", "full"])
def test_the_printed_hint_resumes_the_run_as_it_was(workdir, tmp_path, monkeypatch, capsys, kind):
    """Ctrl-C at step 2 of 4, then exactly the printed `--resume latest --output-dir X`: the
    run continues with its own settings (LoRA or not) and ends bit-identical to an
    uninterrupted one."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _main(_args(workdir, ref, "--max-steps", "4", *kind), capsys)[0] == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        code, text = _main(_args(workdir, cut, "--max-steps", "4", *kind), capsys)
    assert code == 130, text
    hint = re.search(r"resume with (.+)", text).group(1).strip()
    assert hint.startswith("--resume latest --output-dir")
    code, text = _main(["train", *shlex.split(hint)], capsys)
    assert code == 0, text
    assert f"resumed from {cut / 'checkpoints' / 'step_00000002'} at step 2" in text
    assert losses(cut) == losses(ref) and sorted(losses(cut)) == [1, 2, 3, 4]
    w_ref, w_cut = weights(ref), weights(cut)
    assert all((w_ref[k] == w_cut[k]).all() for k in w_ref)
    assert (cut / "final" / "adapter").is_dir() == bool(kind)
    saved = yaml.safe_load((cut / "config.yaml").read_text())
    assert saved["adapter"]["lora"] == bool(kind) and saved["optim"]["lr"] == 3e-3


@pytest.fixture(scope="module")
def lora_run(workdir, tmp_path_factory):
    """A 2-step LoRA run with a checkpoint at step 2, on its own copy of the data."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "train.jsonl"
    shutil.copy(workdir / "train.jsonl", data)
    run = root / "run"
    args = _args(workdir, run, "--max-steps", "2", "--save-every", "2", *LORA)
    args[args.index("--train-data") + 1] = str(data)
    assert main(args) == 0
    return run


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "0.01"], "--lr 0.01: the run being resumed was trained with 0.003; "),
        (["--lora-targets", "all-linear"], "--lora-targets all-linear: the run being resumed was"),
        (["--lora-r", "8"], "--lora-r 8: the run being resumed was trained with 4;"),
        (["--model", "MODEL2"], "--model MODEL2: the run being resumed was trained with "),
        (["--train-on", "last"], "--train-on last: the run being resumed was trained with all;"),
        (["--dtype", "fp32"], "--dtype fp32: the run being resumed was trained with fp64;"),
        (["--grad-clip", "0.5"], "--grad-clip 0.5: the run being resumed was trained with 1.0;"),
        (["--warmup-ratio", "0.1"], "--warmup-ratio 0.1: the run being resumed was trained with"),
        (["--seed", "7"], "--seed 7: the run being resumed was trained with 0;"),
        (["--no-lora"], "from a LoRA run (adapters only), this run is a full fine-tune"),
    ],
)
def test_a_change_that_trains_something_else_is_refused(lora_run, tmp_path, capsys, flags, message):
    if "MODEL2" in flags:  # another model directory (never loaded: refused before)
        flags = [f.replace("MODEL2", str(tmp_path / "other")) for f in flags]
        message = message.replace("MODEL2", str(tmp_path / "other"))
    before = _snapshot(lora_run)
    code, text = _main(
        ["train", "--resume", "latest", "--output-dir", str(lora_run), *flags], capsys
    )
    assert code == 2
    last = text.strip().splitlines()[-1]
    assert last.startswith("sftune: error: ") and message in last, text
    assert "Traceback" not in text and text.count("sftune: error:") == 1
    if "trained with" in message:
        assert "a resumed run keeps its settings" in last
    assert _snapshot(lora_run) == before


def test_a_data_file_reordered_in_place_is_refused(workdir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(workdir / "train.jsonl", data)
    run = tmp_path / "run"
    args = _args(workdir, run, "--max-steps", "2", "--save-every", "2", "--train-data", str(data))
    assert _main(args, capsys)[0] == 0
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(reversed(lines)))  # the same bytes, another order: the same size
    before = _snapshot(run)
    code, text = _main(["train", "--resume", "latest", "--output-dir", str(run)], capsys)
    assert code == 2, text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"sftune: error: {data}: its content changed since the run"), text
    assert _snapshot(run) == before


def test_allowed_changes_are_applied_and_said(lora_run, tmp_path, capsys):
    """More steps and another cadence: applied, reported, recorded; the given settings that
    equal the saved ones (or say "auto" where the build resolved them) are no change."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    flags = ["--max-steps", "4", "--log-every", "2", "--dtype", "auto", "--lr", "3e-3"]
    code, text = _main(["train", "--resume", "latest", "--output-dir", str(run), *flags], capsys)
    assert code == 0, text
    said = next(line for line in text.splitlines() if line.startswith("sftune: resuming with"))
    assert "max_steps 4 (was 2)" in said and "log_every 2 (was 1)" in said
    assert "lr" not in said and "dtype" not in said
    assert sorted(losses(run)) == [1, 2, 3, 4]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["max_steps"] == 4 and saved["model"]["dtype"] == "fp64"
    assert saved["log"]["output_dir"] == str(run)
    # The validation at the end of the 2-step run stays; the resumed run adds step 4's.
    assert [r["step"] for r in read_metrics(run) if "val_loss" in r] == [0, 2, 4]


def test_a_checkpoint_named_by_path_continues_in_a_new_directory(
    lora_run, tmp_path, monkeypatch, capsys
):
    """`--resume CHECKPOINT_DIR` alone: the saved settings, a new runs/<timestamp>, and the
    run the checkpoint came from untouched."""
    monkeypatch.chdir(tmp_path)
    before = _snapshot(lora_run)
    ckpt = lora_run / "checkpoints" / "step_00000002"
    code, text = _main(["train", "--resume", str(ckpt), "--max-steps", "3"], capsys)
    assert code == 0, text
    (new,) = (tmp_path / "runs").iterdir()
    assert sorted(losses(new)) == [3] and (new / "final" / "adapter").is_dir()
    assert yaml.safe_load((new / "config.yaml").read_text())["log"]["output_dir"] == str(
        Path("runs") / new.name
    )
    assert _snapshot(lora_run) == before


def test_a_run_resumed_at_its_last_step_logs_one_validation_there(workdir, tmp_path, capsys):
    """Killed after the last validation (during the final save): the resumed run validates at
    that step again, and metrics.jsonl and samples.jsonl hold that step once."""
    run = tmp_path / "run"
    args = _args(workdir, run, "--max-steps", "2", "--save-every", "2", "--num-samples", "1")
    args += ["--max-new-tokens", "2"]
    assert _main(args, capsys)[0] == 0
    shutil.rmtree(run / "final")  # what a kill during the final save leaves
    code, text = _main(["train", "--resume", "latest", "--output-dir", str(run)], capsys)
    assert code == 0, text
    assert [r["step"] for r in read_metrics(run) if "val_loss" in r] == [0, 2]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 2]
    assert (run / "final").is_dir()


def test_a_run_killed_during_its_first_checkpoint_starts_over(workdir, tmp_path, capsys):
    """No complete checkpoint and no final/: a rerun is refused with the way out, and
    `--resume latest` starts over from step 0 with the saved settings, saying so."""
    run = tmp_path / "run"
    args = _args(workdir, run, "--max-steps", "2", "--save-every", "2", "--lr", "1e-2")
    assert _main(args, capsys)[0] == 0
    ckpts = run / "checkpoints"
    (ckpts / "step_00000002").rename(ckpts / ".tmp_step_00000002")  # a partial write
    shutil.rmtree(run / "final")
    code, text = _main(args, capsys)
    assert code == 2 and "already holds a run" in text and "starts over from step 0" in text
    code, text = _main(["train", "--resume", "latest", "--output-dir", str(run)], capsys)
    assert code == 0, text
    assert "no complete checkpoint" in text and "starting over from step 0" in text
    assert sorted(losses(run)) == [1, 2]  # once each: the old rows were replaced
    assert [r["step"] for r in read_metrics(run) if "val_loss" in r] == [0, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-2
    assert (run / "final").is_dir() and (ckpts / "step_00000002").is_dir()


def test_resume_settings_compare_given_values_with_the_saved_run():
    saved = config_mod.from_flat(
        dict(dtype="fp32", micro_batch_size=4, train_on="all", lr=1e-3, max_steps=10)
    )
    # The defaults the build resolves ("auto", 0) mean "as resolved before".
    same = dict(dtype="auto", micro_batch_size=0, train_on="auto", lr="1e-3", resume="latest")
    cfg, replaced = config_mod.resume_settings(saved, same)
    assert replaced == {"resume": None}
    assert (cfg.model.dtype, cfg.optim.micro_batch_size, cfg.optim.lr) == ("fp32", 4, 1e-3)
    cfg, replaced = config_mod.resume_settings(saved, {"max_steps": "20", "dist": "ddp"})
    assert cfg.optim.max_steps == 20 and replaced == {"max_steps": 10, "dist": "auto"}
    with pytest.raises(
        ConfigError, match=r"^--dtype fp64: the run being resumed was trained with fp32"
    ):
        config_mod.resume_settings(saved, {"dtype": "fp64"})
    with pytest.raises(ConfigError, match=r"^--shuffle false: .* trained with true"):
        config_mod.resume_settings(saved, {"shuffle": False})
