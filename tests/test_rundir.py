"""The run directory is safe: a user's own files are never overwritten, an unusable
--output-dir is refused before the model loads, and one run at a time holds it (a lock of
PID and host, taken over from a dead process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError, SftuneError
from sftune.train import build as build_mod
from sftune.train.rundir import LOCK_FILE, RunLock
from trainutil import train_args


def _main(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: what is refused must be refused before."""

    def load_model(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(build_mod, "load_model", load_model)


def _one_line_error(code: int, text: str, message: str) -> str:
    assert code == 2, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("sftune: error: ") and message in last, text
    assert "Traceback" not in text and text.count("sftune: error:") == 1
    return last


def test_a_directory_of_the_users_files_is_refused(
    workdir, tmp_path, capsys, monkeypatch, no_model
):
    """`--config config.yaml --output-dir .` in the user's folder: nothing overwritten."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("lr: 3e-3\n")
    (tmp_path / "samples.jsonl").write_text('{"prompt": "mine", "response": "mine"}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = train_args(workdir, Path("."), "--config", "config.yaml")
    last = _one_line_error(*_main(args, capsys), "not empty and not a sftune run")
    assert "config.yaml, samples.jsonl" in last
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unusable_output_dir_is_refused_before_the_model_loads(
    workdir, tmp_path, capsys, no_model, where
):
    if where == "file":
        out = tmp_path / "a-file"
        out.write_text("mine")
        message = "is a file, not a directory"
    else:
        out = Path("/proc/sftune-test/run")
        message = "cannot create it"
    _one_line_error(*_main(train_args(workdir, out), capsys), f"--output-dir {out}: {message}")
    if where == "file":
        assert out.read_text() == "mine"


def test_a_failed_build_leaves_no_directory_behind(workdir, tmp_path, capsys, no_model):
    out = tmp_path / "new" / "run"
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(train_args(workdir, out))
    assert not (tmp_path / "new").exists()


def test_a_list_where_a_string_is_expected_is_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: [a, b]\n")
    with pytest.raises(ConfigError, match=r"output_dir: expected str, got \['a', 'b'\]"):
        config_mod.from_flat(config_mod._flatten_file(str(path)))
    for name in ("model", "train_data", "lora_targets", "report_to"):
        with pytest.raises(ConfigError, match=f"{name}: expected str"):
            config_mod.from_flat({name: {"a": 1}})
    assert config_mod.from_flat({"run_name": 7}).log.run_name == "7"  # a YAML number is fine


HOLD = """
import sys
from pathlib import Path
from sftune.train.rundir import RunLock
lock = RunLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def _holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_one_run_at_a_time_and_a_dead_holders_lock_is_taken_over(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    first = _holder(out)
    try:
        with pytest.raises(
            SftuneError, match=rf"another sftune run is writing there \(PID {first.pid} on "
        ):
            RunLock.acquire(out)
        # The second `sftune train` into the directory: one line naming the first.
        text = _one_line_error(*_main(train_args(workdir, out), capsys), f"PID {first.pid} on")
        assert "since" in text
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_FILE).is_file()  # a killed run leaves its lock file
    lock = RunLock.acquire(out)
    assert lock.note and f"took over the lock of PID {first.pid}" in lock.note
    assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    lock.release()
    assert not (out / LOCK_FILE).exists()


def test_a_released_lock_lets_the_next_run_in(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    proc.communicate("")  # the holder releases and exits
    assert proc.returncode == 0 and not out.exists()  # it created the directory: removed
    lock = RunLock.acquire(out)
    assert lock.note is None
    lock.release()
