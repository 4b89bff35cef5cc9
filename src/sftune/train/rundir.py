"""The run directory: what may be written there, who writes it now, and what `--resume` continues.

    <output-dir>/.lock          {"pid": 4242, "host": "box", "since": "2026-12-04T18:00:00Z"}
                                held (flock) by the one run writing here, removed at its exit
    <output-dir>/config.yaml    the resolved config: what trains
    <output-dir>/checkpoints/   step_*/ (train/checkpoint.py), each with its own config.yaml

- A directory is a run's when it holds `checkpoints/`, `final/` or `metrics.jsonl`
  (`RUN_MARKERS`). A new run goes only into a missing or empty directory: a user's own
  files (a config file, a samples.jsonl) are never overwritten; `--resume` continues a run.
- `--resume` takes the saved run's resolved config as the base; the settings given again may
  change only what `config.RESUME_MAY_CHANGE` lists (`config.resume_settings`), and the data
  files must hold the same bytes as when the run started (`data_digests`).
- `--resume CHECKPOINT_DIR` without `--output-dir` continues into a new directory (the
  default runs/<timestamp>); `--resume latest --output-dir X` continues the run in X.
- A run killed before its first checkpoint was complete has a config.yaml and metrics but
  nothing to resume from: `--resume latest` there starts it over from step 0 with its saved
  settings, and says so.
- One run at a time: rank 0 takes an flock on `.lock` before writing anything. The kernel
  drops it when the process dies, so the lock of a killed run is taken over (with a note).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftune import config as config_mod
from sftune.config import RunConfig
from sftune.data.cache import file_digest
from sftune.errors import DataError, SftuneError
from sftune.train import checkpoint

LOCK_FILE = ".lock"
# What makes a directory hold a run (never overwritten; --resume continues it).
RUN_MARKERS = ("checkpoints", "final", "metrics.jsonl")


# ----------------------------------------------------------------------------- directory checks


def held_markers(out: Path) -> list[str]:
    return [m for m in RUN_MARKERS if (out / m).exists()]


def check_output_dir(out: Path, resuming: bool) -> None:
    """`out` can take this run: a directory (or nothing yet) that is not a user's own files,
    and that holds no other run unless this one resumes (`--resume`)."""
    if out.exists() and not out.is_dir():
        raise SftuneError(f"--output-dir {out}: is a file, not a directory")
    if not out.is_dir():
        return
    held = held_markers(out)
    if held and not resuming:
        how = "pass --resume latest to continue it"
        if restartable(out):
            how += " (it has no complete checkpoint: it starts over from step 0 with its settings)"
        raise SftuneError(
            f"{out}: already holds a run ({', '.join(held)}); {how}, or choose another --output-dir"
        )
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if others and not held:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SftuneError(
            f"--output-dir {out}: not empty and not a sftune run (it holds {shown}); a run "
            "writes config.yaml, metrics.jsonl and samples.jsonl there: choose a new or empty "
            "directory"
        )


def restartable(out: Path) -> bool:
    """A run stopped before its first checkpoint was complete: its config and metrics, no
    complete checkpoint, no final/."""
    return (
        (out / "config.yaml").is_file()
        and bool(held_markers(out))
        and not (out / "final").exists()
        and not checkpoint.list_checkpoints(out)
    )


# ----------------------------------------------------------------------------- resume


@dataclass(frozen=True)
class Resume:
    """What `--resume` continues: the config to build and where its state comes from."""

    cfg: RunConfig  # the saved run's settings, with the allowed changes applied
    checkpoint: Path | None  # None: the run had no complete checkpoint and starts over
    trainer: dict  # the checkpoint's trainer state ({} when starting over)
    notes: tuple[str, ...]  # what was changed, or that the run starts over


def plan_resume(given: dict[str, Any], verify_contents: bool = True) -> Resume:
    """The run that `--resume` continues, from the settings given (a CLI's flags and config
    file keys, or every field of a config built in code): refuses, in one line, a change that
    would train something else (config.resume_settings). `verify_contents=False`: the
    checkpoint's files are checked by size only (checkpoint.resolve_resume)."""
    resume, out = given["resume"], given.get("output_dir")
    if resume == "latest" and out is None:
        raise SftuneError(
            "--resume latest continues the run in --output-dir: give it (or --resume CHECKPOINT_DIR)"
        )
    run = Path(out or ".")
    latest = resume == "latest"
    if latest and (run / "final").is_dir() and not checkpoint.list_checkpoints(run):
        raise SftuneError(
            f"{run}: --resume latest, but there is no checkpoint: the run finished and kept "
            f"only final/ (train further from it with --model {run / 'final'} into a new "
            "--output-dir)"
        )
    path = (
        None
        if latest and restartable(run)
        else checkpoint.resolve_resume(resume, run, verify_contents)
    )
    saved = config_mod.load((path or run) / "config.yaml")
    trainer: dict = {}
    if path is not None:
        # The kind first (LoRA or full), as asked: its own message says what does not fit.
        adapters = given.get("lora", saved.adapter.lora) or given.get("qlora", saved.adapter.qlora)
        trainer = checkpoint.check_kind(path, bool(adapters))
    cfg, replaced = config_mod.resume_settings(saved, given)
    if not latest and out is None:
        # A checkpoint named by its path starts a branch in a new directory, as without
        # --resume: continuing in its own run directory would rewrite that run's later steps.
        cfg = config_mod.with_values(cfg, output_dir=None)
    notes = []
    if path is None:
        notes.append(
            f"{out} has no complete checkpoint (the run stopped before its first one was "
            "written): starting over from step 0 with its saved settings"
        )
    shown = {k: v for k, v in replaced.items() if k != "resume"}
    if shown:
        now = config_mod.flat_values(cfg)
        listed = ", ".join(
            f"{k} {now[k]} (was {config_mod.show_value(v)})" for k, v in shown.items()
        )
        notes.append(f"resuming with {listed}")
    return Resume(cfg, path, trainer, tuple(notes))


def data_digests(train_path: str, val_path: str | None) -> dict[str, str | None]:
    """Content fingerprints of the data files (blake2b of the bytes, as the packing cache keys
    them), saved in every checkpoint so that a resume refuses a file that changed."""
    out: dict[str, str | None] = {}
    for name, path in (("train_data", train_path), ("val_data", val_path)):
        out[name] = file_digest(Path(path)) if path and Path(path).is_file() else None
    return out


def check_data(now: dict[str, str | None], saved: dict | None, paths: dict[str, Any]) -> None:
    """The data files hold what they held when the resumed run started (saved is None for
    checkpoints written before fingerprints were)."""
    for name, digest in (saved or {}).items():
        if digest is not None and now.get(name) != digest:
            raise DataError(
                paths[name],
                f"its content changed since the run being resumed started (--{name.replace('_', '-')}"
                " fingerprint differs); a resumed run trains on the same data: restore the file, "
                "or start a new run",
            )


# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """An exclusive flock on `<out>/.lock` holding this process's PID, host and start time.

    The kernel releases an flock when its process dies, so a lock file left by a killed run
    is taken over; a live holder on this host is refused even where the filesystem ignores
    flock (its PID is alive). `release` removes the file, and the directory too when this run
    created it and left nothing in it (a run that failed while building).
    """

    def __init__(self, out: Path, fd: int, created: list[Path], note: str | None) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = fd
        self.created = created
        self.note = note

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        created = [p for p in [out, *out.parents] if not p.exists()][::-1]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SftuneError(f"--output-dir {out}: cannot create it ({e.strerror})") from None
        path = out / LOCK_FILE
        for _ in range(10):  # retried only when a releasing run removed the file under us
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                cls._remove_created(created)
                raise SftuneError(
                    f"--output-dir {out}: cannot write there ({e.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(os.read(fd, 4096).decode(errors="replace"))
                os.close(fd)
                raise SftuneError(cls._busy(out, holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = _holder(os.read(fd, 4096).decode(errors="replace"))
            note = None
            if holder.get("pid") and holder.get("pid") != os.getpid():
                alive = _pid_alive(int(holder["pid"]))
                if holder.get("host") == socket.gethostname() and alive:
                    os.close(fd)  # a filesystem without flock: the PID decides
                    raise SftuneError(cls._busy(out, holder))
                note = (
                    f"took over the lock of PID {holder['pid']} on {holder.get('host')} (since "
                    f"{holder.get('since')}): that run is gone"
                )
            since = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            return cls(out, fd, created, note)
        raise SftuneError(f"{path}: cannot take the lock (it keeps being replaced)")

    @staticmethod
    def _busy(out: Path, holder: dict) -> str:
        who = (
            f"PID {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
            if holder
            else "its holder did not say who it is"
        )
        return (
            f"--output-dir {out}: another sftune run is writing there ({who}); wait for it "
            f"to end or choose another --output-dir (if no run is, delete {out / LOCK_FILE})"
        )

    @staticmethod
    def _remove_created(created: list[Path]) -> None:
        for p in reversed(created):  # the deepest first; only directories left empty
            try:
                p.rmdir()
            except OSError:
                return

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before the unlock: no one locks a removed file
        finally:
            os.close(self.fd)
            self.fd = None
        self._remove_created(self.created)
