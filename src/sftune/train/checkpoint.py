"""Checkpoints that survive a crash mid-save, resume exactly on any number of ranks, are
verified before they are read, and never run code when read.

    <output-dir>/checkpoints/step_00000100/
        model_optim/      torch.distributed.checkpoint (sharded under FSDP, reshardable)
        trainer.json      step counters, sampler position, LR scheduler (plain JSON)
        rng_rank{r}.json  each rank's Python, NumPy, torch (and CUDA) RNG states
        config.yaml       the resolved run config
        manifest.json     every file above with its size and SHA-256 (written last)

Every checkpoint is written into `.tmp_step_...` and renamed when complete, so a crash
during a save leaves the previous checkpoints untouched and never a broken `step_*`; a save
that fails (a full disk) removes its temporary directory and is one line on every rank.

Reading one runs no code from it, since checkpoints are downloaded and shared: sftune's own
state is JSON (tensors in it as tagged lists of values), and DCP's two pickles are read
safely. Its `.metadata` (a pickle that DCP reads with `pickle.load`; torch 2.13 offers no safe
path for it, and `torch.load(weights_only=True)` reads only torch.save's zip format) goes
through an unpickler that resolves only the classes that format uses (`read_dcp_metadata`).
In the shards, tensors are read by DCP with `torch.load(weights_only=True)`; the optimizer's
non-tensor values (lr, betas, ...) by DefaultLoadPlanner with `weights_only=False`, so our
planner reads them with weights_only=True first (`_SafePlanner`). Before anything is read,
the manifest is checked (`verify`): a truncated, deleted or overwritten file is one line
naming it, and `--resume latest` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sftune import config as config_mod
from sftune.errors import SftuneError
from sftune.files import (
    MANIFEST,
    atomic_dir,
    atomic_write_text,
    causes,
    commit_dir,
    disk_full_error,
    free_bytes,
    human_bytes,
    is_disk_full,
    temp_dir_for,
    write_manifest,
)
from sftune.train import distributed
from sftune.train.checkpoint_files import DCP_DIR, RNG, TRAINER, verify
from sftune.train.distributed import World
from sftune.transforms import fp8

_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp_step_"
# One process without a process group is a supported case of DCP, not a mistake.
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def remove_stale_temps(output_dir: Path, world: World) -> None:
    """Rank 0 removes the `.tmp_step_*` directories of saves that a killed run left behind.
    Only the run that holds `output_dir` calls this (its save, the loop's start), so no other
    run is writing one."""
    root = output_dir / "checkpoints"
    if world.is_main and root.is_dir():
        for tmp in root.glob(_TEMP_PREFIX + "*"):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- verify, resolve


def resolve_resume(resume: str, output_dir: Path, contents: bool = True) -> Path:
    """The checkpoint to resume, verified: the path named, or for "latest" the newest in
    `output_dir` that verifies (a line names the newer ones skipped, and why). Rank 0 reads
    the files; every rank gets its answer, or its one-line error. `contents=False` checks the
    manifest's sizes only, not the SHA-256 of every file (the CLI's early look, which every
    torchrun rank makes before there is a process group; the build verifies contents)."""
    answer = None
    if distributed.is_main_process():
        try:
            answer = (str(_find_resume(resume, output_dir, contents)), None)
        except SftuneError as e:
            answer = (None, str(e))
    path, error = distributed.broadcast_object(answer)
    if error:
        raise SftuneError(error)
    return Path(path)


def _find_resume(resume: str, output_dir: Path, contents: bool) -> Path:
    if resume != "latest":
        path = Path(resume)
        if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
            raise SftuneError(
                f"{path}: a run directory, not a checkpoint: pass --resume latest --output-dir "
                f"{path}, or one of its checkpoints/step_*"
            )
        verify(path, contents)
        return path
    found = list_checkpoints(output_dir)
    if not found:
        raise SftuneError(
            f"{output_dir}: --resume latest, but there is no checkpoint in {output_dir / 'checkpoints'}"
        )
    skipped = []
    for path in reversed(found):
        try:
            verify(path, contents)
        except SftuneError as e:
            skipped.append(f"{path.name} ({e})")
            continue
        if skipped and contents:  # the sizes-only look is provisional: the build's is said
            print(
                f"sftune: --resume latest: skipped {'; '.join(skipped)}; resuming from {path}",
                file=sys.stderr,
            )
        return path
    raise SftuneError(
        f"{output_dir}: --resume latest: no checkpoint verifies: {'; '.join(skipped)}"
    )


# ----------------------------------------------------------------------------- JSON state


_TENSOR = "__tensor__"


def _to_json(obj):
    """Plain data for json: tensors (the scheduler's learning rates as tensors, RNG states)
    become {"__tensor__": dtype, "shape", "values"}, exact for every dtype."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu()
        return {
            _TENSOR: str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "values": t.flatten().tolist(),
        }
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state keys must be strings: {list(obj)[:5]}")
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_json(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.generic):  # a NumPy scalar (a count from an array)
        return obj.item()
    raise TypeError(f"checkpoint state holds a {type(obj).__name__}, which JSON cannot hold")


def _tensor_hook(d: dict):
    if _TENSOR not in d:
        return d
    dtype = getattr(torch, str(d[_TENSOR]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {d[_TENSOR]!r}")
    return torch.tensor(d["values"], dtype=dtype).reshape(d["shape"])


def write_state(path: Path, state: dict) -> None:
    atomic_write_text(path, json.dumps(_to_json(state)))


def read_state(path: Path, what: str) -> dict:
    """A JSON state file written by `write_state` (one line naming it if it is not one)."""
    try:
        state = json.loads(path.read_bytes(), object_hook=_tensor_hook)
    except FileNotFoundError:
        raise SftuneError(f"{path}: missing; the checkpoint is incomplete") from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, RecursionError) as e:
        raise SftuneError(f"{path}: not a valid {what} ({e}); the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise SftuneError(f"{path}: not a valid {what} (not a JSON object)")
    return state


def read_trainer_state(path: Path) -> dict:
    """The trainer state of checkpoint `path` (step counters, sampler, scheduler, whatever the
    loop stored, plus "world_size" and "adapters_only"), as a plain dict."""
    if not (path / TRAINER).is_file() and (path / "trainer.pt").is_file():
        verify(path, contents=False)  # the one-line refusal of the old pickle format
    state = read_state(path / TRAINER, "trainer state")
    ok = isinstance(state.get("world_size"), int) and state["world_size"] > 0
    if not ok or not isinstance(state.get("adapters_only"), bool):
        raise SftuneError(
            f"{path / TRAINER}: not a valid trainer state (no world_size / adapters_only)"
        )
    return state


def _rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(path: Path) -> None:
    state = read_state(path, "RNG state")
    try:
        version, mt, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        random.setstate((version, tuple(mt), gauss))
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SftuneError(
            f"{path}: not a valid RNG state ({e}); the checkpoint is damaged"
        ) from None


# ----------------------------------------------------------------------------- DCP, read safely


# Every class a DCP .metadata names (torch 2.13; checked on full, LoRA, FSDP and 8-bit runs).
_METADATA_CLASSES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
            "MetadataIndex",
            "StorageMeta",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib._local", "PosixPath"),  # its module from Python 3.13
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and torch dtypes. Code in a pickle runs only
    through the callables it names (os.system, builtins.eval, ...), which all come from
    find_class: Python's documented way to restrict unpickling."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(path: Path) -> Metadata:
    """A DCP `.metadata` file, without running code from it (one line naming it otherwise).
    Its shards must be files of its own directory."""
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP's Metadata")
        for info in metadata.storage_data.values():
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise pickle.UnpicklingError(f"names a shard outside its directory: {name!r}")
    except FileNotFoundError:
        raise SftuneError(f"{path}: missing; the checkpoint is incomplete") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        OSError,
        RecursionError,
        MemoryError,
    ) as e:
        raise SftuneError(f"{path}: not a valid checkpoint metadata file, refused ({e})") from None
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_dcp_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self.path) / ".metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """DefaultLoadPlanner, except that non-tensor values are unpickled with weights_only=True
    (plain data and tensors only). What DCP's own `torch.load(weights_only=False)` then reads
    is what torch.save wrote from those checked values, never the file's bytes."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception:
            raise SftuneError(
                f"{read_item.dest_index.fqn}: holds objects other than plain data and tensors, "
                "refused (unpickling them could run code)"
            ) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        super().load_bytes(read_item, clean)


def load_dcp(state: dict, dcp_dir: Path, *, no_dist: bool = False) -> None:
    """dcp.load of `state` in place from `dcp_dir`, through SafeReader and _SafePlanner; a
    failure is one line naming the directory."""
    read_dcp_metadata(dcp_dir / ".metadata")  # its error as is: DCP would log a traceback
    try:
        dcp.load(
            state, storage_reader=SafeReader(str(dcp_dir)), planner=_SafePlanner(), no_dist=no_dist
        )
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        found = list(causes(e))
        own = next((c for c in found if isinstance(c, SftuneError)), None)
        if own is not None:
            message = str(own)
            raise SftuneError(
                message if str(dcp_dir) in message else f"{dcp_dir}: {message}"
            ) from None
        inner = found[-1] if len(found) > 1 else e
        first = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
        raise SftuneError(f"{dcp_dir}: cannot read the checkpoint ({first})") from None


# ----------------------------------------------------------------------------- save, load


def _attempt(path: Path, write: Callable[[], object]) -> str | None:
    """None once `write()` succeeded; else the one-line message for a full disk or another
    OS error (other exceptions are bugs, and raise)."""
    try:
        write()
    except SftuneError as e:
        return str(e)
    except (Exception, CheckpointException) as e:  # CheckpointException: DCP's, all ranks'
        if is_disk_full(e):
            return str(disk_full_error(path, "cannot write the checkpoint"))
        oserror = next((c for c in causes(e) if isinstance(c, OSError)), None)
        if oserror is None:
            raise
        return f"{oserror.filename or path}: cannot write the checkpoint ({oserror.strerror or oserror})"
    return None


def _stop_if_failed(error: str | None, tmp: Path, output_dir: Path, step: int, world: World):
    """Every rank raises the first rank's error (a collective); rank 0 removes `tmp` first."""
    error = distributed.first_error(error)
    if error is None:
        return
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = list_checkpoints(output_dir)
    newest = (
        f"the newest checkpoint is {kept[-1]} (--resume latest continues from it)"
        if kept
        else "there is no earlier checkpoint"
    )
    raise SftuneError(f"{error}; checkpoint step {step} was not written, {newest}")


def save(
    output_dir: Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    cfg: config_mod.RunConfig,
    world: World,
    keep: int,
    adapters_only: bool = False,
) -> Path:
    """Writes checkpoint `step` atomically (all ranks call this) and prunes old ones.

    adapters_only (LoRA): the trainable tensors and their optimizer state, not the frozen base.
    `trainer_state` is plain data (JSON, and tensors). A failed write (a full disk) is one
    line on every rank and leaves no temporary directory.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(".tmp_" + final.name)  # one name that every rank writes into

    def prepare() -> None:
        remove_stale_temps(output_dir, world)
        temp_dir_for(final, tmp.name)

    def write() -> None:
        options = StateDictOptions(ignore_frozen_params=adapters_only)
        model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
        model_sd = fp8.plain_state_dict(model_sd)  # plain tensors: loadable without torchao
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        write_state(tmp / RNG.format(world.rank), _rng_state())
        if world.is_main:
            meta = {"world_size": world.world_size, "adapters_only": adapters_only}
            write_state(tmp / TRAINER, {**trainer_state, **meta})
            config_mod.save(cfg, tmp / "config.yaml")

    def commit() -> None:
        write_manifest(tmp)  # every rank's files are there (after the collective above)
        commit_dir(tmp, final)  # replaces the same step saved again (interrupt after a save)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    _stop_if_failed(_attempt(tmp, prepare) if world.is_main else None, tmp, output_dir, step, world)
    _stop_if_failed(_attempt(tmp, write), tmp, output_dir, step, world)
    _stop_if_failed(_attempt(tmp, commit) if world.is_main else None, tmp, output_dir, step, world)
    return final


def check_kind(path: Path, adapters_only: bool) -> dict:
    """The trainer state of a checkpoint that this kind of run (LoRA or full) can resume."""
    trainer = read_trainer_state(path)
    saved_kind = trainer["adapters_only"]
    if saved_kind != adapters_only:
        kinds = {True: "a LoRA run (adapters only)", False: "a full fine-tune"}
        raise SftuneError(
            f"{path}: cannot resume: the checkpoint is from {kinds[saved_kind]}, this run is "
            f"{kinds[adapters_only]}"
        )
    return trainer


def load(
    path: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    adapters_only: bool = False,
) -> dict:
    """Restores model, optimizer and this rank's RNG; returns the trainer state dict.

    `path` comes from `resolve_resume`, which verified its manifest. A LoRA checkpoint resumes
    only a LoRA run and a full one only a full run (one line else).
    """
    trainer = check_kind(path, adapters_only)
    options = StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    state = {"model": fp8.plain_state_dict(model_sd), "optim": optim_sd}
    load_dcp(state, path / DCP_DIR)
    set_state_dict(
        module,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    rng_file = path / RNG.format(world.rank)
    # Same world size: each rank gets its own RNG back. Other world sizes: rank 0's.
    if trainer["world_size"] != world.world_size or not rng_file.is_file():
        rng_file = path / RNG.format(0)
    _set_rng_state(rng_file)
    return trainer


# ----------------------------------------------------------------------------- disk space


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # a DTensor's numel is its full size: all ranks' shards


def check_disk_space(
    output_dir: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: config_mod.RunConfig,
    adapters_only: bool,
) -> str:
    """Refuses, in one line, a run whose checkpoint and final/ clearly cannot fit in the free
    space where `output_dir` goes; else a note of the sizes. Estimated from the tensors: a
    checkpoint holds the (trainable, for adapters) weights and the optimizer's two moments per
    trained value (as allocated, else fp32 / 8-bit by the optimizer), final/ all weights."""
    params = list(module.parameters())
    trained = [p for p in params if p.requires_grad]
    weights = sum(_nbytes(p) for p in params)
    if optimizer.state:
        moments = sum(
            _nbytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)
        )
    elif cfg.optim.optimizer in config_mod.EIGHT_BIT_OPTIMIZERS:
        moments = 2 * sum(p.numel() for p in trained)
    else:
        moments = 2 * sum(_nbytes(p) for p in trained)
    ckpt = moments + (sum(_nbytes(p) for p in trained) if adapters_only else weights)
    final = weights
    need = (ckpt if cfg.checkpoint.save_every else 0) + (final if cfg.checkpoint.save_final else 0)
    free = distributed.broadcast_object(free_bytes(output_dir))
    sizes = f"a checkpoint ~{human_bytes(ckpt)}, final/ ~{human_bytes(final)}"
    if need > free:
        parts = [f"a checkpoint ~{human_bytes(ckpt)}"] if cfg.checkpoint.save_every else []
        parts += [f"final/ ~{human_bytes(final)}"] if cfg.checkpoint.save_final else []
        raise SftuneError(
            f"{output_dir}: not enough disk space: the run needs about {human_bytes(need)} "
            f"({' + '.join(parts)}) and {human_bytes(free)} is free; free some space or "
            "choose another --output-dir"
        )
    note = f"disk: {sizes}; {human_bytes(free)} free"
    # At the peak, the checkpoints kept and the next one, written before the oldest goes.
    peak = need + (cfg.checkpoint.keep_checkpoints * ckpt if cfg.checkpoint.save_every else 0)
    if peak > free:
        note += (
            f" (keeping {cfg.checkpoint.keep_checkpoints} checkpoints may need "
            f"{human_bytes(peak)}: a save that fills the disk stops the run)"
        )
    return note


def full_model_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model on the CPU, on rank 0 (empty on other ranks)."""
    sd = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return hf_keys(sd)


def hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained module's state dict under the Hugging Face model's own names: without the
    loss wrapper's "lm." (train/module.py)."""
    prefix = "lm."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def portable_tokenizer_class(model_dir: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot load; both
    load the same tokenizer.json as "PreTrainedTokenizerFast" (checked with 4.57 and 5.24)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False))


def save_final(
    output_dir: Path,
    module: torch.nn.Module,
    hf_model,
    tokenizer,
    world: World,
    write_model: Callable[[dict, Path], None] | None = None,
) -> Path:
    """`save_pretrained` model + tokenizer into <output-dir>/final, atomically (all ranks call).

    `write_model(full state dict, directory)` replaces the plain save_pretrained (LoRA writes
    its adapter and the merged model there). A full disk is one line on every rank, and
    leaves no final/ (nor a temporary one).
    """
    state_dict = full_model_state_dict(module)
    final = output_dir / "final"
    error = None
    if world.is_main:
        try:
            with atomic_dir(final) as tmp:
                if write_model is None:
                    hf_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                else:
                    write_model(state_dict, tmp)
                if getattr(hf_model, "generation_config", None) is not None:
                    hf_model.generation_config.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                portable_tokenizer_class(tmp)
        except SftuneError as e:  # a full disk (atomic_dir): one line, on every rank
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise SftuneError(error)
    return final
