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
0600 / 0700 would otherwise leak into a model directory meant to be shared). A write that
fills the disk is one line naming the target (`SftuneError`), whichever writer hit it.

A manifest (`write_manifest` / `verify_manifest`) records each file's size and SHA-256, so a
reader refuses a truncated, deleted or overwritten file in one line naming it:

    write_manifest(tmp)          # tmp/manifest.json, once every file is there
    verify_manifest(checkpoint)  # SftuneError naming the first file that differs

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from sftune.errors import SftuneError

MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
# How the writers sftune calls report a full disk when they do not pass the OSError on:
# torch's zip writer (torch.save, DCP's shards) checks its position after a short write, and
# safetensors' Rust writer formats the OS error into its message.
_DISK_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "os error 28",
    "unexpected pos",
    "file write failed",
)


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(path, e)
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(target, e)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- a full disk


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, what caused it, and (torch.distributed.checkpoint's CheckpointException) each
    rank's failure."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is ENOSPC / EDQUOT, however the writer wrapped it."""
    for e in causes(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXT):
            return True
    return False


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    if n < 1e6:
        return f"{n / 1e3:.0f} kB"
    return f"{n / 1e6:.3g} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def disk_full_error(path: str | os.PathLike, doing: str = "cannot write") -> SftuneError:
    return SftuneError(
        f"{path}: {doing}: no space left on device ({human_bytes(free_bytes(path))} free)"
    )


def raise_if_disk_full(path: str | os.PathLike, exc: BaseException) -> None:
    """One line naming `path` in place of whatever the writer raised on a full disk."""
    if not isinstance(exc, SftuneError) and is_disk_full(exc):
        raise disk_full_error(path) from exc


# ----------------------------------------------------------------------------- manifests


def _sha256(path: Path) -> str:
    with path.open("rb") as f:  # streamed in blocks: any file size in constant memory
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(root: str | os.PathLike) -> Path:
    """root/manifest.json: every file under `root` (recursively, dot-files included) with its
    size and SHA-256. Call it once every file is written; it is written atomically."""
    root = Path(root)
    files = {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }
    atomic_write_text(
        root / MANIFEST, json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1)
    )
    return root / MANIFEST


def read_manifest(root: str | os.PathLike) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of root/manifest.json (one line if it is not one)."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_bytes())
        files = data["files"]
        if data.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a manifest of this version")
        for name, entry in files.items():
            if not _inside(name) or not isinstance(entry.get("size"), int):
                raise ValueError(f"bad entry {name!r}")
            if not isinstance(entry.get("sha256"), str):
                raise ValueError(f"bad entry {name!r}")
    except FileNotFoundError:
        raise SftuneError(f"{path}: missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SftuneError(f"{path}: unreadable ({e}); the checkpoint is damaged") from None
    return files


def _inside(name: str) -> bool:
    """A relative path that stays inside the directory (no "..", not absolute)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def verify_manifest(root: str | os.PathLike, contents: bool = True) -> dict[str, dict]:
    """Every file root/manifest.json lists is there with its size and (`contents`) its
    SHA-256; returns the listing. The first that differs is one line naming the file.

    Sizes are checked for all files first, so a truncated or deleted file is reported
    without reading the others."""
    root = Path(root)
    files = read_manifest(root)
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise SftuneError(f"{path}: missing (listed in {MANIFEST}); the checkpoint is damaged")
        size = path.stat().st_size
        if size != entry["size"]:
            raise SftuneError(
                f"{path}: {size} bytes where {MANIFEST} says {entry['size']} (truncated or "
                "overwritten); the checkpoint is damaged"
            )
    for name, entry in files.items() if contents else ():
        if _sha256(root / name) != entry["sha256"]:
            raise SftuneError(
                f"{root / name}: contents differ from {MANIFEST} (SHA-256); the checkpoint "
                "is damaged"
            )
    return files
