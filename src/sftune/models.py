"""Load a causal language model and its tokenizer: a local Hugging Face directory or a preset.

A preset (`sftune.presets`) is a model shipped inside a pip package as a quantized GGUF file.
Transformers reads the GGUF and dequantizes it into an ordinary dense model; that takes a
while, so the result is saved once with `save_pretrained` under the cache
(`<cache root>/models/<preset>`) and every later load reads that directory instead. A
tokenizer loaded alone (`load_tokenizer("smollm2-135m")`) is read from the GGUF's metadata and
kept in `<cache root>/tokenizers/<preset>`: no weights are converted for it.

    model, tokenizer, info = load_model_and_tokenizer("smollm2-135m", device=torch.device("cpu"))

Nothing here contacts a hub: every `from_pretrained` call passes `local_files_only=True`.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftune.config import parse_rope_scaling
from sftune.errors import ConfigError, SftuneError
from sftune.files import atomic_dir
from sftune.presets import (
    PRESETS,
    Preset,
    check_model,
    package_dir,
    preset_cache_dir,
    preset_tokenizer_dir,
)

# The names config.DTYPES allows (besides "auto" and "bf16-mixed", resolved by the trainer).
# fp64 is for tests that compare runs exactly: its rounding noise is far below any tolerance.
_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}


def _gguf_dequantize_kwargs() -> dict:
    """Ask transformers for a dense model from a GGUF file.

    In transformers 5.x `from_pretrained(gguf_file=...)` goes through a GGUF quantizer. For
    architectures its new loader does not cover (llama, gemma3 among them, in 5.17 and 5.24) the
    legacy loader dequantizes anyway, but unless `dequantize=True` is asked for the quantizer
    stays attached and marks the model as neither trainable nor serializable. With it, the
    quantization config is removed after loading and the model is an ordinary dense one.
    Older transformers has no `GgufConfig` and always returns a dense model.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert_preset(preset: Preset, target: Path) -> None:
    """Dequantize a preset's GGUF into `target` with save_pretrained, atomically.

    A crash never leaves a half-written model where the next run would take it for a finished
    one; a concurrent process that finished first keeps its copy.
    """
    if package_dir(preset.package) is None:
        raise SftuneError(f"preset {preset.name!r} needs its package: {preset.install}")
    with (
        atomic_dir(target, replace=False) as tmp,
        tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch,
    ):
        gguf = preset.locate(Path(scratch))  # an assembled GGUF is only needed until converted
        tokenizer = _gguf_tokenizer(preset, gguf)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,  # Q4 blocks dequantize exactly to fp32; bf16 would round them
            local_files_only=True,
            **_gguf_dequantize_kwargs(),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _gguf_tokenizer(preset: Preset, gguf: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in a preset's GGUF, read with the preset's own class (metadata only)."""
    import transformers

    loader = getattr(transformers, preset.tokenizer_class)
    return loader.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def ensure_preset_tokenizer(name: str) -> Path:
    """A directory holding the preset's tokenizer: its own (made once from the GGUF, seconds,
    no weights written), else the converted model's. A tokenizer load never converts a model."""
    target = preset_tokenizer_dir(name)
    if (target / "tokenizer_config.json").is_file():
        return target
    if (preset_cache_dir(name) / "config.json").is_file():  # converted already: its tokenizer
        return preset_cache_dir(name)
    preset = PRESETS[name]
    if package_dir(preset.package) is None:
        raise SftuneError(f"preset {preset.name!r} needs its package: {preset.install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        atomic_dir(target, replace=False) as tmp,
        tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch,
    ):
        _gguf_tokenizer(preset, preset.locate(Path(scratch))).save_pretrained(tmp)
    return target


def ensure_preset(name: str) -> Path:
    """The local directory of a preset, converting it from its GGUF on first use."""
    target = preset_cache_dir(name)
    if not (target / "config.json").exists():
        _convert_preset(PRESETS[name], target)
    return target


def resolve_source(name_or_path: str) -> tuple[Path, str | None]:
    """Turn a preset name or a directory into (local model dir, preset name or None)."""
    check_model(name_or_path)
    if name_or_path in PRESETS:
        return ensure_preset(name_or_path), name_or_path
    return Path(name_or_path).expanduser(), None


# ----------------------------------------------------------------------------- dtype, attention


def dtype_name(torch_name: str) -> str:
    """ "bfloat16" (ModelInfo.dtype) -> "bf16", the config's spelling."""
    return next(k for k, v in _DTYPES.items() if v == getattr(torch, torch_name))


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The parameter dtype: "auto" is bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # CPU bf16 matmuls are slow on most hosts and fp32 keeps the demo's numbers exact.
        return torch.float32
    return _DTYPES[requested]  # the names were validated with the config (config.ModelConfig)


def resolve_attention(requested: str, device: torch.device) -> str:
    """The attention implementation: "auto" is flash_attention_2 on CUDA when installed, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError("attention 'flash_attention_2' needs the flash-attn package installed")
    if requested == "flash_attention_2" and device.type != "cuda":
        raise ConfigError(f"attention 'flash_attention_2' needs a CUDA device, not {device.type}")
    return requested


# ----------------------------------------------------------------------------- rope scaling

# What each scaling type reads besides its factor (transformers' modeling_rope_utils): the
# pretraining context it scales from, and for llama3 the band of wavelengths it blends over,
# Llama 3.1's own values.
_ROPE_EXTRA = {
    "linear": {},
    "yarn": {},
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def apply_rope_scaling(config: PretrainedConfig, value: str) -> None:
    """Set `--rope-scaling TYPE:FACTOR` on a model config, before the model is built from it.

    The context is multiplied from the model's current `max_position_embeddings` M: it becomes
    M x FACTOR. An unscaled model gets TYPE with FACTOR (yarn and llama3 scaling from M). A
    model scaled already by the same TYPE keeps its original context and gets its factor
    multiplied (Llama 3.1, llama3 8x from 8192: llama3:2 is 16x, 262,144 positions); another
    type would have to stack two scalings, which transformers cannot express, and is refused.
    A config with rope parameters per layer type (Gemma 3) scales its full-attention layers
    only: its sliding-window layers never see a distance past their window.

        >>> apply_rope_scaling(config, "yarn:4")  # doctest: +SKIP
        >>> config.rope_parameters  # doctest: +SKIP
        {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
         'original_max_position_embeddings': 2048}
    """
    kind, factor = parse_rope_scaling(value)
    text = config.get_text_config()
    if not getattr(text, "rope_parameters", None):
        raise ConfigError(
            f"--rope-scaling {value}: this {text.model_type} model has no rotary position "
            "embeddings to scale; leave --rope-scaling out"
        )
    params = dict(text.rope_parameters)
    nested = "full_attention" in params and isinstance(params["full_attention"], dict)
    current = dict(params["full_attention"]) if nested else params
    had = current.get("rope_type", "default")
    context = text.max_position_embeddings
    if had == "default":
        scaled = {**current, "rope_type": kind, "factor": factor, **_ROPE_EXTRA[kind]}
        if kind != "linear":
            scaled["original_max_position_embeddings"] = context
    elif had == kind:
        scaled = {**current, "factor": float(current.get("factor") or 1.0) * factor}
    else:
        raise ConfigError(
            f"--rope-scaling {value}: the model is already {had}-scaled (factor "
            f"{current.get('factor')}); only --rope-scaling {had}:FACTOR can extend it further"
        )
    text.rope_parameters = {**params, "full_attention": scaled} if nested else scaled
    text.max_position_embeddings = int(context * factor)


def load_config(source: Path, rope_scaling: str | None) -> PretrainedConfig:
    """The model's config, with `--rope-scaling` applied (what from_pretrained builds)."""
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if rope_scaling:
        apply_rope_scaling(config, rope_scaling)
    return config


# ----------------------------------------------------------------------------- loading


def quiet_libraries(verbose: bool) -> None:
    """Fold the libraries' own chatter so that sftune's bar and summary lines stay readable;
    `--verbose` keeps it. Each source, silenced where it comes from:

    - transformers' bars ("Loading weights", "Writing model shards") and log lines: its
      logging switches (which also turn off the hub's bars);
    - the GGUF conversion bar of a preset's first use: transformers draws it with tqdm
      directly, so it is routed through transformers' own (now disabled) tqdm;
    - Python warnings raised in transformers, such as the FutureWarning about
      `is_gradient_checkpointing` that peft's PeftModel triggers;
    - bitsandbytes' warning, on import (peft imports it), that it could not fetch an optional
      CPU kernel from the hub: sftune never asks for one.
    """
    if verbose:
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support has no such bar either
        pass
    else:
        gguf_utils.tqdm = hf_logging.tqdm
    warnings.filterwarnings("ignore", module=r"transformers\..*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for logs and the run directory."""

    source: str  # the local directory the weights were read from
    preset: str | None
    dtype: str  # e.g. "float32"
    attn_implementation: str
    num_params: int
    num_non_embedding_params: int


def _embedding_params(model: torch.nn.Module) -> set[int]:
    """The ids of the input and output embedding parameters (one tensor when tied)."""
    ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            ids.update(id(p) for p in module.parameters())
    return ids


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the embeddings), tied tensors counted once."""
    # model.parameters() already yields a tied tensor once.
    params = list(model.parameters())
    embedding = _embedding_params(model)
    total = sum(p.numel() for p in params)
    non_embedding = sum(p.numel() for p in params if id(p) not in embedding)
    return total, non_embedding


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a preset, a model directory or a tokenizer-only directory.

    It must have an EOS token: packing uses it as the document delimiter. Any failure is one
    line naming the directory.
    """
    path = Path(name_or_path).expanduser()
    try:
        if name_or_path in PRESETS:
            source = ensure_preset_tokenizer(name_or_path)
        else:
            source = path if path.is_dir() else resolve_source(name_or_path)[0]
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except SftuneError:
        raise
    except Exception as e:  # transformers raises many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SftuneError(f"cannot load the tokenizer from {name_or_path}: {first}") from e
    if tokenizer.eos_token_id is None:
        raise SftuneError(f"the tokenizer in {source} has no eos_token; packing needs one")
    if name_or_path in PRESETS:  # errors name "smollm2-135m", not a folder of the cache
        tokenizer.name_or_path = name_or_path
    return tokenizer


def check_safetensors(directory: str | Path) -> None:
    """Every *.safetensors file in `directory` has a whole header and all the bytes it
    describes (a truncated download or copy is one line naming the file, not a traceback
    from deep in from_pretrained). Reads the headers only."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SftuneError(
                f"{path}: not a complete safetensors file ({e}); it is truncated or damaged, "
                "copy or export it again"
            ) from None


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    quantization: dict | None = None,
    rope_scaling: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load a causal LM and its tokenizer onto `device`, from a preset or a local directory.

    `quantization`: extra from_pretrained arguments for a quantized base (QLoRA); such a model
    is placed on `device` by its loader. `rope_scaling`: `--rope-scaling TYPE:FACTOR`
    (`apply_rope_scaling`); the model's config carries it into final/.
    """
    torch_dtype = resolve_dtype(dtype, device)
    attention = resolve_attention(attn_implementation, device)
    if attention == "flash_attention_2" and torch_dtype == torch.float32:
        raise ConfigError("attention 'flash_attention_2' needs dtype bf16 or fp16, not fp32")
    source, preset = resolve_source(name_or_path)
    tokenizer = load_tokenizer(name_or_path if preset else str(source))  # a preset's: as prepare's
    check_safetensors(source)
    placement = {"device_map": {"": device}} if quantization else {}
    scaled = {"config": load_config(source, rope_scaling)} if rope_scaling else {}
    model = AutoModelForCausalLM.from_pretrained(
        source,
        **scaled,
        dtype=torch_dtype,
        attn_implementation=attention,
        local_files_only=True,
        **(quantization or {}),
        **placement,
    )
    if not quantization:
        model.to(device)
    total, non_embedding = count_params(model)
    info = ModelInfo(
        source=str(source),
        preset=preset,
        dtype=str(torch_dtype).removeprefix("torch."),
        attn_implementation=model.config._attn_implementation,
        num_params=total,
        num_non_embedding_params=non_embedding,
    )
    return model, tokenizer, info


# ----------------------------------------------------------------------------- FLOPs


def model_flops_per_token(config: PretrainedConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 * non-embedding params + 12 * layers * d_attn * seq_length.

    The first term is forward + backward through the weights; the second is the attention
    scores and values (the PaLM appendix B estimate). d_attn is heads * head_dim, which is the
    hidden size for Llama/SmolLM2 (Gemma 3 differs). The parameter count comes from building
    the model on the meta device, so it is exact for any architecture and allocates nothing.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    _, non_embedding = count_params(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    d_attn = text.num_attention_heads * head_dim
    return 6.0 * non_embedding + 12.0 * text.num_hidden_layers * d_attn * seq_length
