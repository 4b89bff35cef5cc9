"""The reference log-probs of DPO and IPO: one forward-only pass over the packed pairs, before
training, cached with the packed data.

    logps = reference_logps(r_module, dataset, objective, micro_batch_size=8, device=device)
    dataset.set_reference(logps)                 # (num_pairs, 2) float64: chosen, rejected

Training then holds one model: full-parameter DPO of an 8B model needs SFT's memory, not twice
it. The pass runs where the build has the starting weights (before a resume loads a
checkpoint's), so the default reference is the starting `--model`; with --lora it runs with the
adapters disabled (the base alone); `--ref-model DIR` loads that model for the pass and frees it.
Validation pairs are scored against the same reference, never the policy (TRL once used the
policy there, huggingface/trl#6443).

The cache entry (`<cache>/reference/<key>.npy`, read with allow_pickle=False) is keyed by the
packed pairs' own key (file bytes, tokenizer, template, settings: `PackedPairDataset.cache_key`)
and the reference model's fingerprint (`model_fingerprint`: its config and weight files' names,
sizes, modification times and first MiB, the dtype, the 4-bit quantization, the attention and
the device type), so a changed file, model or setting computes it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from sftune.errors import ConfigError
from sftune.files import atomic_path
from sftune.paths import cache_root
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.evaluate import rank_chunks
from sftune.train.step import load_batch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
HEAD_BYTES = 1 << 20


def model_fingerprint(source: str | Path, **settings) -> str:
    """A hash of a model directory (or file) without reading all its weights: config.json and
    each weight file's name, size, mtime and first MiB; plus `settings` (dtype, quantization,
    attention, device), which change the numbers too."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    root = Path(source)
    files = sorted(root.iterdir()) if root.is_dir() else [root]
    for f in files:
        if f.name != "config.json" and not f.name.endswith(WEIGHT_SUFFIXES):
            continue
        st = f.stat()
        digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(HEAD_BYTES if f.name != "config.json" else -1))
    return digest.hexdigest()


def cache_file(data_key: str, model_key: str, cache_dir: Path | None = None) -> Path:
    key = hashlib.blake2b(f"{data_key}:{model_key}".encode(), digest_size=16).hexdigest()
    return (cache_dir or cache_root()) / "reference" / f"{key}.npy"


@torch.no_grad()
def reference_logps(
    module: torch.nn.Module,
    dataset,
    objective,
    *,
    micro_batch_size: int,
    device: torch.device,
    world: World = World(),
) -> np.ndarray:
    """(num_pairs, 2) float64: each pair's summed chosen and rejected response log-probs under
    `module`, all ranks together (rank r scores rows r, r + W, ...; a pair lies in one row, so
    each is scored once). Under FSDP every rank runs the same number of forwards."""
    was_training = module.training
    module.eval()
    out = torch.zeros(dataset.num_pairs, 2, dtype=torch.float64, device=device)
    for chunk in rank_chunks(len(dataset), micro_batch_size, world, device):
        b = load_batch(dataset, chunk or [0], device, varlen=False)
        logps = objective.policy_logps(module, b)
        if chunk:
            out.index_add_(
                0, b["pair_ids"], torch.stack([logps.chosen, logps.rejected], 1).double()
            )
    module.train(was_training)
    return distributed.all_reduce_sum(out).cpu().numpy()


def load_or_compute(
    compute, dataset, model_key: str, world: World, device: torch.device, cache_dir=None
) -> tuple[np.ndarray, bool]:
    """The cached reference log-probs of `dataset` under the model `model_key`, or `compute()`'s
    (every rank computes: the pass is a collective), written by rank 0. (logps, from cache)."""
    path = cache_file(dataset.cache_key, model_key, cache_dir)
    cached = _read(path, dataset.num_pairs)
    hit = distributed.min_over_ranks(int(cached is not None), device)
    if hit:
        return cached, True
    logps = compute()
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, logps, allow_pickle=False)
    distributed.barrier()
    return logps, False


def _read(path: Path, num_pairs: int) -> np.ndarray | None:
    """A cache entry of the right shape, else None (absent, torn or foreign: computed again)."""
    try:
        logps = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if logps.shape != (num_pairs, 2) or logps.dtype != np.float64 or not np.isfinite(logps).all():
        return None
    return logps


def disabled_adapters(adapter):
    """The base model alone, for the pass of a LoRA run (PEFT's `disable_adapter`)."""
    return adapter.disable_adapter() if adapter is not None else contextlib.nullcontext()


def check_same_tokenizer(ref_tokenizer, tokenizer, ref_model: str, model: str) -> None:
    """--ref-model must tokenize as --model does: the log-probs are of the same token ids.
    Only the ids: the policy's tokenizer renders the text, so the reference's chat template is
    set to the policy's first (in place)."""
    from sftune.data.cache import tokenizer_fingerprint

    ref_tokenizer.chat_template = tokenizer.chat_template

    ours, theirs = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(ref_tokenizer)
    if ours != theirs:
        raise ConfigError(
            f"--ref-model {ref_model}: its tokenizer differs from that of --model {model} "
            f"(vocabulary {len(ref_tokenizer)} vs {len(tokenizer)} tokens, or other ids or "
            "special tokens): a reference must score the same token ids"
        )


def attach_reference(
    cfg,
    module,
    adapter,
    info,
    tokenizer,
    device: torch.device,
    world: World,
    datasets,
    objective,
    micro_batch_size: int,
) -> list[str]:
    """Score `datasets` (train and validation) under the reference and attach the log-probs
    (`set_reference`); the build's notes. The reference is --ref-model, loaded here and freed
    after, or the starting model in the build's hands (its adapters disabled)."""
    settings = {
        "dtype": str(info.dtype),
        "autocast": str(module.autocast_dtype),
        "qlora": cfg.adapter.qlora,
        "attn": info.attn_implementation,
        "fused": module.fused,
        "device": device.type,
        "rope_scaling": cfg.model.rope_scaling,
    }
    name = cfg.loss.ref_model or cfg.model.model
    if cfg.loss.ref_model:
        scorer, source = _load_reference(cfg, module, info, tokenizer, device), cfg.loss.ref_model
    else:
        scorer, source = module, info.source
    model_key = model_fingerprint(_resolved_source(source), **settings)
    notes = []
    for dataset in datasets:

        def compute(dataset=dataset):
            with disabled_adapters(None if cfg.loss.ref_model else adapter):
                return reference_logps(
                    scorer,
                    dataset,
                    objective,
                    micro_batch_size=micro_batch_size,
                    device=device,
                    world=world,
                )

        logps, cached = load_or_compute(compute, dataset, model_key, world, device)
        dataset.set_reference(logps)
        notes.append(
            f"reference log-probs of {dataset.num_pairs:,} pairs of {dataset.path} under "
            f"{name}{' (base without adapters)' if adapter is not None and not cfg.loss.ref_model else ''}: "
            f"{'from the cache' if cached else 'computed'}"
        )
    if scorer is not module:
        del scorer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return notes


def _resolved_source(name: str) -> Path:
    from sftune.models import resolve_source

    return resolve_source(name)[0]


def _load_reference(cfg, module, info, tokenizer, device: torch.device):
    """--ref-model as a scoring module like the policy's (dtype, attention, head, 4-bit base)."""
    from sftune.models import load_model_and_tokenizer
    from sftune.train.module import CausalLMWithLoss
    from sftune.transforms import lora

    load_dtype = "fp32" if cfg.model.dtype == "bf16-mixed" else cfg.model.dtype
    lm, ref_tokenizer, _ = load_model_and_tokenizer(
        cfg.loss.ref_model,
        device=device,
        dtype=load_dtype,
        attn_implementation=info.attn_implementation,
        quantization=lora.quantization_kwargs(cfg),
        rope_scaling=cfg.model.rope_scaling,  # the positions the policy is trained at
    )
    check_same_tokenizer(ref_tokenizer, tokenizer, cfg.loss.ref_model, cfg.model.model)
    lm.requires_grad_(False)
    return CausalLMWithLoss(lm, fused=module.fused, autocast_dtype=module.autocast_dtype).eval()
