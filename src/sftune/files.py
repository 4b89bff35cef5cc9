"""Atomic writes: a reader (or the next run) sees the old file or the new one, never half of one.

Every file or directory sftune writes that a later run reads (checkpoints, the final model,
packed-data cache entries, converted presets, the demo set, metrics rewrites, the PNG) goes
through one of these:

    atomic_write_text(run / "config.yaml", text)
    with atomic_path(run / "learning_curve.png") as tmp:   # for writers that want a path
        fig.savefig(tmp, format="png")
    with atomic_dir(cache / "entry", replace=False) as tmp:  # keep a concurrent winner's copy
        np.save(tmp / "tokens.npy", tokens)

Temporary names start with "." beside the target, so a crash leaves only dot-files behind.
Permissions follow the umask, as a plain `open()` / `mkdir()` would give (tempfile's own
0600 / 0700 would otherwise leak into a model directory meant to be shared).

Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside `path`; renamed onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _chmod_default(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Replace `path` with one line per item (newline added) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def temp_dir_for(target: str | os.PathLike, name: str | None = None) -> Path:
    """An empty directory beside `target` to build it in (`name`: a fixed name that several
    processes agree on, e.g. all ranks writing one checkpoint; a unique one otherwise)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = target.parent / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, target: str | os.PathLike, *, replace: bool = True) -> None:
    """Move the finished `tmp` onto `target`.

    replace=True: an existing `target` is swapped out and removed (the old copy stays intact
    until the new one is in place). replace=False: an existing complete `target` (a concurrent
    writer that finished first) is kept and `tmp` is discarded.
    """
    target = Path(target)
    _chmod_tree(tmp)
    if target.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, target)
    except OSError:
        if replace or not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _chmod_tree(root: Path) -> None:
    """The umask's default modes for the tree: tempfile makes its directory 0700, and some
    writers (safetensors among them) leave files 0600."""
    _chmod_default(root, directory=True)
    for sub in root.rglob("*"):
        if not sub.is_symlink():
            _chmod_default(sub, directory=sub.is_dir())


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory in a temporary sibling; it becomes `target` when the block succeeds
    (see `commit_dir` for `replace`). On an error the temporary directory is removed."""
    tmp = temp_dir_for(target)
    try:
        yield tmp
        commit_dir(tmp, target, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
