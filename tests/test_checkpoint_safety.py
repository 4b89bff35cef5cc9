"""Checkpoints as hostile or damaged input (issue 28 §1, §6, §7, §9): reading one never runs
code from it, a damaged one is one line naming the file (and `--resume latest` falls back to
the newest that verifies), a full disk is one line that loses nothing it need not, and a
truncated model file is one line. The same on a real full filesystem: tests/faults/disk_full.sh.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from sftune.cli import main
from sftune.errors import SftuneError
from sftune.files import verify_manifest, write_manifest
from sftune.train import checkpoint
from sftune.train.loop import train
from trainutil import tiny_config, train_args


class _Payload:
    """Unpickling this runs `touch <marker>` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def run4(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fp64 run of the tiny model with checkpoints at steps 2 and 4 (read-only)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    return train(tiny_config(workdir, out, save_every=2)).output_dir


def _resume_args(workdir: Path, out: Path, resume: str) -> list[str]:
    """`sftune train` with run4's settings, resuming `resume` into `out`."""
    same = ["--max-steps", "4", "--seed", "1", "--dtype", "fp64", "--save-every", "2"]
    return train_args(workdir, out, *same, "--resume", resume)


def _copy_step(run: Path, step: int, into: Path) -> Path:
    return Path(shutil.copytree(checkpoint.checkpoint_dir(run, step), into / f"step_{step:08d}"))


def _one_error(err: str) -> str:
    """The CLI's error line; there is exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("sftune: error:")]
    assert len(lines) == 1 and "Traceback" not in err and '  File "' not in err, err
    return lines[0]


def _payload_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)  # a zip, as DCP stores a non-tensor value
    return buf.getvalue()


def _splice_into_shard(ckpt: Path, payload: bytes) -> str:
    """Puts `payload` in place of the first non-tensor value DCP stored (an optimizer setting),
    moving the items after it; .metadata is rewritten with DCP's own classes."""
    dcp_dir = ckpt / "model_optim"
    md = pickle.loads((dcp_dir / ".metadata").read_bytes())  # our own file: trusted here
    fqn = next(k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index, info = next((i, s) for i, s in md.storage_data.items() if i.fqn == fqn)
    shard = dcp_dir / info.relative_path
    data = shard.read_bytes()
    shard.write_bytes(data[: info.offset] + payload + data[info.offset + info.length :])
    delta = len(payload) - info.length
    for i, s in md.storage_data.items():
        if s.relative_path == info.relative_path and s.offset > info.offset:
            md.storage_data[i] = dataclasses.replace(s, offset=s.offset + delta)
    md.storage_data[index] = dataclasses.replace(info, length=len(payload))
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    return fqn


def _craft(kind: str, ckpt: Path, marker: Path) -> str:
    """Makes `ckpt` hostile in one file; returns the name the error must give. The manifest is
    rewritten to match, so that the safe readers (not the hashes) are what refuse."""
    payload = pickle.dumps(_Payload(marker))
    if kind == "old trainer.pt":  # the repro: config.yaml, .metadata and a trainer.pt
        for name in ("trainer.json", "rng_rank0.json", "manifest.json"):
            (ckpt / name).unlink()
        torch.save({"x": _Payload(marker)}, ckpt / "trainer.pt")
        return "trainer.pt"
    if kind == "trainer":
        (ckpt / "trainer.json").write_bytes(payload)
        name = "trainer.json"
    elif kind == "rng":
        (ckpt / "rng_rank0.json").write_bytes(payload)
        torch.save({"x": _Payload(marker)}, ckpt / "rng_rank0.pt")  # the old name: never read
        name = "rng_rank0.json"
    elif kind == "metadata":
        (ckpt / "model_optim" / ".metadata").write_bytes(payload)
        name = ".metadata"
    else:
        name = _splice_into_shard(ckpt, _payload_bytes(marker))
    write_manifest(ckpt)
    return name


KINDS = ["old trainer.pt", "trainer", "rng", "metadata", "shard value"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_checkpoint_runs_no_code(run4, workdir, tmp_path, capsys, kind):
    """Each file a hostile checkpoint could carry a pickle payload in: `export` and
    `train --resume` refuse it in one line naming it, and the payload never runs."""
    marker = tmp_path / "PWNED"
    ckpt = _copy_step(run4, 4, tmp_path)
    name = _craft(kind, ckpt, marker)
    capsys.readouterr()
    code = main(["export", str(ckpt), "--out", str(tmp_path / "exported")])
    err = capsys.readouterr().err
    if kind in ("rng", "shard value"):  # export reads neither the RNG nor the optimizer
        assert code == 0, err
    else:
        assert code == 2 and name in _one_error(err)
    assert not marker.exists()
    code = main(_resume_args(workdir, tmp_path / "resumed", str(ckpt)))
    err = capsys.readouterr().err
    assert code == 2 and name in _one_error(err)
    assert not marker.exists()
    if kind == "shard value":  # the unsafe load would run it: the test's payload is live
        torch.load(io.BytesIO(_payload_bytes(marker)), weights_only=False)
        assert marker.exists()


def test_the_metadata_reader_takes_every_class_dcp_writes(run4):
    """The restricted unpickler reads what DCP wrote as pickle.load does."""
    path = checkpoint.checkpoint_dir(run4, 4) / "model_optim" / ".metadata"
    assert checkpoint.read_dcp_metadata(path) == pickle.loads(path.read_bytes())


def test_trainer_state_json_keeps_tensors_exactly(tmp_path):
    """The scheduler of a compiled step keeps its learning rates as fp32 tensors: they come
    back as the same tensors; floats, ints and nesting as they were."""
    state = {
        "scheduler": {"base_lrs": [torch.tensor(1e-3)], "last_epoch": 3, "x": None},
        "elapsed": 0.1 + 0.2,
        "rng": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "bf16": torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16),
    }
    checkpoint.write_state(tmp_path / "s.json", state)
    back = checkpoint.read_state(tmp_path / "s.json", "state")
    lr = back["scheduler"]["base_lrs"][0]
    assert lr.dtype == torch.float32 and torch.equal(lr, state["scheduler"]["base_lrs"][0])
    assert back["elapsed"] == state["elapsed"] and back["scheduler"]["last_epoch"] == 3
    assert torch.equal(back["rng"], state["rng"]) and torch.equal(back["bf16"], state["bf16"])


# ----------------------------------------------------------------------------- damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    """400 kB of finite float32 values over the middle of the shard (the size is unchanged)."""
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 4)
        f.write(np.full(100_000, 0.5, dtype=np.float32).tobytes())


DAMAGE = {
    "truncated shard": ("model_optim/__0_0.distcp", _truncate),
    "deleted shard": ("model_optim/__0_0.distcp", Path.unlink),
    "garbage in shard": ("model_optim/__0_0.distcp", _garbage),
    "truncated metadata": ("model_optim/.metadata", _truncate),
    "deleted rng": ("rng_rank0.json", Path.unlink),
    "empty trainer state": ("trainer.json", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_the_file(run4, tmp_path, damage):
    name, spoil = DAMAGE[damage]
    ckpt = _copy_step(run4, 4, tmp_path)
    spoil(ckpt / name)
    with pytest.raises(SftuneError) as e:
        checkpoint.verify(ckpt)
    assert str(ckpt / name) in str(e.value) and "\n" not in str(e.value)


def test_an_empty_step_directory_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_00000002").mkdir()
    with pytest.raises(SftuneError, match="step_00000002: empty, not a checkpoint"):
        checkpoint.verify(tmp_path / "step_00000002")


def test_export_of_a_truncated_checkpoint_is_one_line(run4, tmp_path, capsys):
    ckpt = _copy_step(run4, 4, tmp_path)
    _truncate(ckpt / "model_optim" / "__0_0.distcp")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "__0_0.distcp" in _one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_resume_latest_skips_what_does_not_verify(run4, workdir, tmp_path, capsys):
    """step_4's shard overwritten and an empty step_6 (a save cut short): --resume latest
    says so and resumes step_2; the run ends bit-identical to the undamaged one. A killed
    save's .tmp_step_* is removed on the way."""
    run = Path(shutil.copytree(run4, tmp_path / "run"))
    shutil.rmtree(run / "final")
    _garbage(checkpoint.checkpoint_dir(run, 4) / "model_optim" / "__0_0.distcp")
    checkpoint.checkpoint_dir(run, 6).mkdir()
    stale = run / "checkpoints" / ".tmp_step_00000008"
    (stale / "model_optim").mkdir(parents=True)
    capsys.readouterr()
    code = main(_resume_args(workdir, run, "latest"))
    err = capsys.readouterr().err
    assert code == 0, err
    skipped = next(line for line in err.splitlines() if "skipped" in line)
    assert "step_00000006 (" in skipped and "step_00000004 (" in skipped
    assert "__0_0.distcp: contents differ" in skipped and "step_00000002" in skipped
    assert not stale.exists()
    from safetensors.torch import load_file

    a, b = load_file(run4 / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_with_nothing_that_verifies_is_one_line(run4, workdir, tmp_path, capsys):
    run = Path(shutil.copytree(run4, tmp_path / "run"))
    for step in (2, 4):
        (checkpoint.checkpoint_dir(run, step) / "trainer.json").write_text("")
    assert main(_resume_args(workdir, run, "latest")) == 2
    line = _one_error(capsys.readouterr().err)
    assert "no checkpoint verifies" in line and "trainer.json" in line


# ----------------------------------------------------------------------------- a full disk


def test_a_save_that_fills_the_disk_is_one_line_and_leaves_no_temporary(
    workdir, tmp_path, capsys, monkeypatch
):
    """The second checkpoint hits a full disk the way torch's writer reports it; the run
    stops in one line naming the directory and the newest good checkpoint, which verifies."""
    real, calls = checkpoint.write_state, []

    def full_on_second_rng(path, state):
        calls.append(path)
        if path.name.startswith("rng") and len([c for c in calls if c.name == path.name]) == 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            )
        real(path, state)

    monkeypatch.setattr(checkpoint, "write_state", full_on_second_rng)
    out = tmp_path / "run"
    code = main(train_args(workdir, out, "--max-steps", "4", "--save-every", "2"))
    line = _one_error(capsys.readouterr().err)
    assert code == 2 and "no space left on device" in line and ".tmp_step_00000004" in line
    assert "the newest checkpoint is" in line and "step_00000002" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    checkpoint.verify(out / "checkpoints" / "step_00000002")


def test_a_final_save_on_a_full_disk_keeps_the_step_in_a_checkpoint(
    workdir, tmp_path, capsys, monkeypatch
):
    """--save-every 0 and final/ fails for a full disk: the last step is kept as a checkpoint
    (the error says so, and how to export it), and no temporary final/ is left."""
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "run"
    code = main(train_args(workdir, out, "--max-steps", "2"))
    line = _one_error(capsys.readouterr().err)
    ckpt = checkpoint.checkpoint_dir(out, 2)
    assert code == 2 and f"{out / 'final'}: cannot write: no space left on device" in line
    assert f"{ckpt} holds step 2" in line and "sftune export" in line
    verify_manifest(ckpt)
    assert not (out / "final").exists() and not [p for p in out.iterdir() if p.name[0] == "."]


def test_a_disk_that_cannot_hold_the_run_is_refused_before_it_starts(
    workdir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 100_000)
    out = tmp_path / "run"
    assert main(train_args(workdir, out, "--max-steps", "2")) == 2
    line = _one_error(capsys.readouterr().err)
    assert "not enough disk space" in line and "100 kB is free" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- truncated models


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_truncated_model_file_is_one_line(workdir, tmp_path, capsys, command):
    model = Path(shutil.copytree(workdir / "model", tmp_path / "model"))
    _truncate(model / "model.safetensors")
    args = ["--prompt", "hi"] if command == "generate" else ["--data", str(workdir / "train.jsonl")]
    assert main([command, "--model", str(model), "--device", "cpu", *args]) == 2
    line = _one_error(capsys.readouterr().err)
    assert f"{model / 'model.safetensors'}: not a complete safetensors file" in line


def test_resume_of_a_run_directory_says_how(run4, tmp_path):
    with pytest.raises(
        SftuneError, match="a run directory, not a checkpoint: pass --resume latest"
    ):
        checkpoint.resolve_resume(str(run4), tmp_path)
