"""`sftune export`: a training checkpoint as a model directory that transformers loads.

    sftune export runs/x/checkpoints/step_00000400 --out models/x-400             # full fine-tune
    sftune export runs/lora/checkpoints/step_00000400 --out models/lora-400       # LoRA: the adapter
    sftune export runs/lora/checkpoints/step_00000400 --out models/m --merge      # and merged model
    sftune export runs/x/checkpoints/step_00000400 --out models/x-bf16 --dtype bf16

A checkpoint (sftune.train.checkpoint) holds the run's resolved config (config.yaml, which
names the base model), trainer.json (whether it holds adapters only), model_optim/, a
torch.distributed.checkpoint written by however many ranks trained, and manifest.json. The
manifest is verified first (a truncated or changed file is one line naming it), and nothing in
the checkpoint is unpickled unsafely (checkpoint.SafeReader). Export reads the model's
tensors only, each at its full shape whatever the sharding was: empty tensors are made from the
checkpoint's metadata and DCP fills them in one process (no process group, no model built, no
optimizer state read). They are written as the run's final/ would have been at that step:

    full fine-tune   <out>/ model (save_pretrained, safetensors) + tokenizer + sftune.json
    LoRA             <out>/ the adapter in PEFT's format (adapter_config.json, base named in it)
                     + tokenizer + sftune.json;
    LoRA --merge     <out>/ the merged model (W + B A * alpha / r) + tokenizer + sftune.json,
                     <out>/adapter/ the adapter

`AutoModelForCausalLM` / `AutoTokenizer` load the model directories, `PeftModel` the adapter,
and `sftune eval` / `generate` take any of them. `--dtype` casts the weights (default: as
trained). `--out` must not exist or be empty, and is written atomically: an error leaves
nothing behind and nothing that was there is touched.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from sftune import config as config_mod
from sftune.errors import ConfigError, SftuneError
from sftune.files import atomic_dir, atomic_write_text
from sftune.train.checkpoint_files import DCP_DIR, verify

EXPORT_DTYPES = ("auto", "bf16", "fp32")


def check_checkpoint(path: Path) -> None:
    """A checkpoint directory that sftune wrote, with every file at its size (the quick check,
    before anything loads; export_checkpoint checks the contents too)."""
    verify(path, contents=False)


def check_out(out: Path) -> None:
    """--out is new, or an empty directory: an export never writes over anything."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SftuneError(f"--out {out}: exists and is not empty; choose another directory")


def export_checkpoint(ckpt: Path, out: Path, *, dtype: str = "auto", merge: bool = False) -> Path:
    """Writes checkpoint `ckpt` as a model (or adapter) directory `out`; see the module doc."""
    import torch

    from sftune.models import quiet_libraries, resolve_source
    from sftune.train.checkpoint import read_trainer_state

    verify(ckpt)
    check_out(out)
    quiet_libraries(verbose=False)
    cfg = config_mod.load(ckpt / "config.yaml")
    trainer = read_trainer_state(ckpt)
    adapters = trainer["adapters_only"]
    if merge and not adapters:
        raise ConfigError(f"--merge: {ckpt} is from a full fine-tune, which has no adapter")
    source, _ = resolve_source(cfg.model.model)
    if not (source / "config.json").is_file():
        raise SftuneError(f"{ckpt}: the run's base model {cfg.model.model} is not there any more")
    state = read_model_state(ckpt)
    cast = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if cast is not None:
        state = {k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_dir(out) as tmp:
        if adapters:
            _write_lora(cfg, state, source, tmp, merge=merge, dtype=cast)
        else:
            _write_model(state, source, tmp, cfg.model.rope_scaling)
        _write_tokenizer(source, tmp, cfg.data.chat_template, trainer.get("chat_template"))
        fmt = trainer.get("prompt_format")
        if fmt:  # checkpoints written before sftune recorded it: `generate` decides itself
            from sftune.train.generate import FORMAT_FILE, tuned_meta

            meta = tuned_meta(cfg, fmt, trainer.get("data_format"))  # as final/ writes it
            atomic_write_text(tmp / FORMAT_FILE, json.dumps(meta))
    return out


def read_model_state(ckpt: Path) -> dict:
    """The model's tensors of a checkpoint, unsharded, by their Hugging Face names, on the CPU
    (for LoRA: the adapters only, by peft's module names)."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from sftune.train.checkpoint import hf_keys, load_dcp, read_dcp_metadata

    saved = read_dcp_metadata(ckpt / DCP_DIR / ".metadata").state_dict_metadata
    prefix = "model."  # checkpoint.save stores {"model": ..., "optim": ...}
    state = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in saved.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise SftuneError(f"{ckpt}: the checkpoint holds no model tensors")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        load_dcp({"model": state}, ckpt / DCP_DIR, no_dist=True)
    return hf_keys(state)


def _write_model(state: dict, source: Path, out: Path, rope_scaling: str | None) -> None:
    """save_pretrained of the base's architecture with the checkpoint's weights (the model is
    built on the meta device: it only carries the config and which weights are tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftune.models import load_config

    config = load_config(source, rope_scaling)  # the run's --rope-scaling, as final/ has it
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    # Tied weights (SmolLM2's embeddings and head) are one tensor in the model, two in the
    # checkpoint: one tensor again, so that save_pretrained stores it once, as final/ does.
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name and name in state:
            state[name] = state[first[id(param)]]
    model.generation_config = _generation_config(source, config)
    model.save_pretrained(out, state_dict=state, safe_serialization=True)


def _generation_config(source: Path, config):
    """The base's generation_config.json where it has one, else the one its config implies (as
    from_pretrained reads it)."""
    from transformers import GenerationConfig

    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source, local_files_only=True)
    return GenerationConfig.from_model_config(config)


def _write_lora(cfg, state: dict, source: Path, out: Path, *, merge: bool, dtype) -> None:
    """The adapter (PEFT's format) in `out`, or with `merge` in out/adapter and the merged
    model in `out` (onto the base read from its directory, as the trainer merges QLoRA)."""
    import torch

    from sftune.models import load_config
    from sftune.transforms import lora

    # peft resolves all-linear to every adapted module's full name; named targets stay as named.
    names = lora.targets(cfg)
    config = lora.peft_config(
        cfg, lora.adapted_modules(state) if names == lora.ALL_LINEAR else None
    )
    lora.save_adapter(config, state, out / lora.ADAPTER_DIR if merge else out, str(source))
    if not merge:
        return
    # The trainer merges a LoRA base in the run's dtype and a QLoRA base in bf16.
    base_dtype = dtype or (
        torch.bfloat16 if cfg.adapter.qlora else next(iter(state.values())).dtype
    )
    base = lora.load_base_weights(str(source), base_dtype)
    merged = lora.merged_state_dict(state, lora.scaling(cfg), base)
    hf_config = load_config(source, cfg.model.rope_scaling)
    hf_config.dtype = base_dtype
    lora.save_merged(merged, hf_config, out)
    _generation_config(source, hf_config).save_pretrained(out)


def _write_tokenizer(
    source: Path, out: Path, chat_template: str | None, text: str | None = None
) -> None:
    """The base's tokenizer, with the run's --chat-template when it had one (as final/ has):
    `text`, the template as the checkpoint saved it, else read again from `chat_template`."""
    from sftune.data.chat_templates import set_chat_template
    from sftune.models import load_tokenizer
    from sftune.train.checkpoint import portable_tokenizer_class

    set_chat_template(load_tokenizer(str(source)), chat_template, text).save_pretrained(out)
    portable_tokenizer_class(out)
