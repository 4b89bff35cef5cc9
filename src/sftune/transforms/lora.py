"""LoRA and QLoRA: low-rank adapters (peft) on a frozen base, a model transform applied at build.

    sftune train --model DIR --lora --lora-r 16 --lora-alpha 32          # bf16 base
    sftune train --model DIR --qlora                                       # 4-bit NF4 base (CUDA)

`apply_lora` injects peft's LoRA layers into the Hugging Face model in place (every linear of
the decoder blocks by default, never the output projection), so the rest of sftune (the loss
module, per-layer compile, FSDP2, the step) sees the same model with fewer trainable
parameters. Checkpoints hold only the trainable (adapter) tensors and their optimizer state.
At the end the run writes:

    final/adapter/    PEFT's format: PeftModel.from_pretrained(base, "final/adapter")
    final/            the merged model (W + B A * alpha / r), loadable with AutoModelForCausalLM

For QLoRA the adapters were trained against the 4-bit base, and the merge adds them to the
bf16 base read from the model directory: the merged model is the bf16 model plus the learnt
delta, not the 4-bit one the adapters saw, so its outputs differ slightly from the trained
4-bit model's (the quantization error of the base).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from sftune.config import RunConfig
from sftune.errors import ConfigError, SftuneError
from sftune.files import atomic_write_text

ADAPTER_DIR = "adapter"
ALL_LINEAR = "all-linear"
_BASE, _A, _B = ".base_layer.", ".lora_A.default.weight", ".lora_B.default.weight"


def enabled(cfg: RunConfig) -> bool:
    return cfg.adapter.lora or cfg.adapter.qlora


def check_available(cfg: RunConfig, device: torch.device, world_size: int) -> None:
    """One-line errors for what cannot work, before the model is loaded."""
    if not enabled(cfg):
        return
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("--lora needs peft: pip install 'sftune[lora]'")
    if cfg.adapter.qlora:
        if device.type != "cuda":
            raise ConfigError("--qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--qlora needs bitsandbytes: pip install 'sftune[qlora]'")
        if world_size > 1:
            raise ConfigError("--qlora runs on one GPU; use --lora (bf16 base) under torchrun")


def quantization_kwargs(cfg: RunConfig) -> dict:
    """from_pretrained arguments for QLoRA's base: 4-bit NF4, double quantization, bf16 compute."""
    if not cfg.adapter.qlora:
        return {}
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    }


def targets(cfg: RunConfig) -> str | list[str]:
    names = [t.strip() for t in cfg.adapter.lora_targets.split(",") if t.strip()]
    return ALL_LINEAR if names in ([], [ALL_LINEAR]) else names


def peft_config(cfg: RunConfig, target_modules: str | list[str] | None = None):
    """peft's LoraConfig for the run (`target_modules`: the modules adapted, else --lora-targets)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.adapter.lora_r,
        lora_alpha=cfg.adapter.lora_alpha,
        lora_dropout=cfg.adapter.lora_dropout,
        target_modules=target_modules or targets(cfg),
        task_type="CAUSAL_LM",
    )


def adapted_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The full names of the modules that hold adapters (model.layers.0.self_attn.q_proj, ...),
    from a state dict's keys: what peft resolves "all-linear" to."""
    return sorted(k[: -len(_A)] for k in state if k.endswith(_A))


def apply_lora(hf_model, cfg: RunConfig):
    """Freeze the base and inject the adapters in place; returns the PeftModel (for its config)."""
    from peft import get_peft_model

    config = peft_config(cfg)
    try:
        # Adapters in the base's dtype: peft's default upcasts them to fp32, which turns every
        # adapter GEMM into an fp32 one (294 of 2,390 ms per 8B step on the H200, profiled).
        peft_model = get_peft_model(hf_model, config, autocast_adapter_dtype=False)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(
            f"--lora-targets {cfg.adapter.lora_targets!r}: {str(e).splitlines()[0]}"
        ) from None
    return peft_model


def scaling(cfg: RunConfig) -> float:
    return cfg.adapter.lora_alpha / cfg.adapter.lora_r


def merged_state_dict(
    full: dict[str, torch.Tensor], scale: float, base: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter folded in: W + (B @ A) * scale.

    `full` is the trained model's state dict (peft's module names); `base`, when given (QLoRA),
    is the unquantized base by its plain names and takes the place of `full`'s base weights.
    """
    adapted = [k[: -len(_A)] for k in full if k.endswith(_A)]
    if base is None:
        base = {k.replace(_BASE, "."): v for k, v in full.items() if ".lora_" not in k}
    out = dict(base)
    for prefix in adapted:
        w = out[prefix + ".weight"]
        delta = full[prefix + _B].double() @ full[prefix + _A].double() * scale
        out[prefix + ".weight"] = (w.double() + delta).to(w.dtype)
    return out


def tied_copies(hf_config) -> set[str]:
    """The names of the weights that `hf_config`'s model ties to an earlier one (SmolLM2's
    lm_head.weight, which is its embedding matrix). save_pretrained stores a tied tensor once,
    under its first name, and from_pretrained ties it again: the model is built on the meta
    device, which costs no memory, to ask it which those are."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    first: dict[int, str] = {}
    return {
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if first.setdefault(id(param), name) != name
    }


def save_merged(merged: dict[str, torch.Tensor], hf_config, out: Path) -> None:
    """The merged weights as an ordinary (unquantized) Hugging Face model directory, with what
    save_pretrained would store: a tied weight once (the run's full state dict holds it under
    both names, as separate tensors: stored twice, SmolLM2's final/ was 651 MB instead of 538)."""
    import copy

    from huggingface_hub import save_torch_state_dict

    config = copy.deepcopy(hf_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tied = tied_copies(config)
    # Own storage for each tensor: a gathered FSDP state dict holds views into larger buffers,
    # which safetensors refuses.
    merged = {k: v.detach().clone() for k, v in merged.items() if k not in tied}
    save_torch_state_dict(merged, out)


def adapter_state_dict(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's saved names (`base_model.model.<module>.lora_A.weight`)."""
    return {
        "base_model.model." + k.replace(".default.weight", ".weight"): v.contiguous()
        for k, v in full.items()
        if _A in k or _B in k
    }


def save_adapter(lora_config, full: dict[str, torch.Tensor], out: Path, base_path: str) -> None:
    """final/adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), from
    peft's LoraConfig (a PeftModel's `peft_config["default"]`, or `peft_config(cfg, ...)`)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = lora_config.to_dict()
    config["base_model_name_or_path"] = base_path
    config["target_modules"] = sorted(config["target_modules"] or [])
    config["task_type"] = "CAUSAL_LM"
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2, default=str))
    save_file(adapter_state_dict(full), str(out / "adapter_model.safetensors"))


def load_base_weights(source: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The unquantized weights of a model directory (QLoRA's merge target), on the CPU."""
    from safetensors.torch import load_file

    files = sorted(Path(source).glob("*.safetensors"))
    if not files:
        raise SftuneError(f"{source}: no safetensors weights to merge the adapters into")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
    return out


def is_adapter_dir(path: str) -> bool:
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def load_for_inference(model: str, *, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer, info) for `sftune eval/generate`: a model directory, a preset, or a
    LoRA adapter directory (its base, named in adapter_config.json, with the adapter merged)."""
    from sftune.models import check_safetensors, load_model_and_tokenizer

    if not is_adapter_dir(model):
        return load_model_and_tokenizer(model, device=device, dtype=dtype)
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(
            f"{model} is a LoRA adapter, which needs peft: pip install 'sftune[lora]'"
        )
    from peft import PeftModel

    config_file = Path(model) / "adapter_config.json"
    try:
        base_name = json.loads(config_file.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SftuneError(f"{config_file}: not a LoRA adapter's config ({e})") from None
    check_safetensors(model)
    base, tokenizer, info = load_model_and_tokenizer(base_name, device=device, dtype=dtype)
    return PeftModel.from_pretrained(base, model).merge_and_unload(), tokenizer, info
