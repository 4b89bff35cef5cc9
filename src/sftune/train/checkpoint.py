"""Checkpoints that survive a crash mid-save and resume exactly, on any number of ranks.

    <output-dir>/checkpoints/step_00000100/
        model_optim/      torch.distributed.checkpoint (sharded under FSDP, reshardable)
        trainer.pt        step counters, sampler position, LR scheduler
        rng_rank{r}.pt    each rank's Python, NumPy, torch (and CUDA) RNG states
        config.yaml       the resolved run config

Every checkpoint is written into `.tmp_step_...` and renamed when complete, so a crash
during a save leaves the previous checkpoints untouched and never a broken `step_*`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from sftune import config as config_mod
from sftune.errors import SftuneError
from sftune.files import atomic_dir, atomic_write_text, commit_dir, temp_dir_for
from sftune.train import distributed, fp8
from sftune.train.distributed import World

_STEP_DIR = re.compile(r"^step_(\d+)$")
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


def resolve_resume(resume: str, output_dir: Path) -> Path:
    """The checkpoint to resume: the newest in `output_dir` for "latest", else the path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise SftuneError(
                f"{output_dir}: --resume latest, but there is no checkpoint in {output_dir / 'checkpoints'}"
            )
        return found[-1]
    path = Path(resume)
    if not (path / "trainer.pt").is_file():
        raise SftuneError(f"{path}: not a checkpoint directory (no trainer.pt)")
    return path


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(".tmp_" + final.name)  # one name that every rank writes into
    if world.is_main:
        temp_dir_for(final, tmp.name)
    distributed.barrier()
    options = StateDictOptions(ignore_frozen_params=adapters_only)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    model_sd = fp8.plain_state_dict(model_sd)  # plain tensors: loadable without torchao
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "model_optim"))
    torch.save(_rng_state(), tmp / f"rng_rank{world.rank}.pt")
    if world.is_main:
        meta = {"world_size": world.world_size, "adapters_only": adapters_only}
        torch.save({**trainer_state, **meta}, tmp / "trainer.pt")
        config_mod.save(cfg, tmp / "config.yaml")
    distributed.barrier()
    if world.is_main:
        commit_dir(tmp, final)  # replaces the same step saved again (interrupt after a save)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def check_kind(path: Path, adapters_only: bool) -> dict:
    """The trainer state of a checkpoint that this kind of run (LoRA or full) can resume."""
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    saved_kind = trainer.get("adapters_only", False)
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

    A LoRA checkpoint resumes only a LoRA run and a full one only a full run (one line else).
    """
    trainer = check_kind(path, adapters_only)
    options = StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
    state = {"model": fp8.plain_state_dict(model_sd), "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "model_optim"))
    set_state_dict(
        module,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    rng_file = path / f"rng_rank{world.rank}.pt"
    # Same world size: each rank gets its own RNG back. Other world sizes: rank 0's.
    if trainer["world_size"] != world.world_size or not rng_file.is_file():
        rng_file = path / "rng_rank0.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer


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
    its adapter and the merged model there).
    """
    state_dict = full_model_state_dict(module)
    final = output_dir / "final"
    if world.is_main:
        with atomic_dir(final) as tmp:
            if write_model is None:
                hf_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            else:
                write_model(state_dict, tmp)
            if getattr(hf_model, "generation_config", None) is not None:
                hf_model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            portable_tokenizer_class(tmp)
    distributed.barrier()
    return final
