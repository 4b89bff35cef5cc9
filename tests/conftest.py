"""Shared fixtures: the shared data folder, the Llama 3 tokenizer (built once), the embedded
presets' tokenizers (SmolLM2, Gemma 3: read once from their GGUF), a tmp cache.

Being the rootdir's conftest in a folder without __init__.py, this file puts tests/ on sys.path
(pytest's default "prepend" import mode), so tests import their helpers by name:
`from tiny import build_tiny_model`, `from trainutil import losses`.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path

import pytest

# The project's read-only data lives beside the repository: ../shared relative to its root.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_report_header(config: pytest.Config) -> str:
    """What decides CPU rounding: torch's threads (OMP_NUM_THREADS) and kernels
    (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS); the equivalence tests hold under any."""
    import torch

    return (
        f"torch {torch.__version__}: {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared data folder (`../shared` from the repository root)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the Llama 3 tokenizer, built once per session from llama-models."""
    pytest.importorskip("tiktoken")
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    out = tmp_path_factory.mktemp("llama3-tokenizer")
    build_llama3_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir: Path):
    """The Meta-Llama-3-8B tokenizer (shared: do not mutate; copy it first)."""
    from sftune.llama3_tokenizer import build_llama3_tokenizer

    return build_llama3_tokenizer(llama3_tokenizer_dir)


@pytest.fixture
def llama3_copy(llama3_tokenizer):
    """A private copy of the Llama 3 tokenizer that a test may change (chat template, EOS)."""
    return copy.deepcopy(llama3_tokenizer)


def _preset_tokenizer(name: str, tokenizer_class: str):
    """A preset's tokenizer read straight from its GGUF with its own class: what
    `load_tokenizer(name)` loads, without converting the model (30 s for SmolLM2) and without
    AutoTokenizer's parse of the whole GGUF for a config (40 s for Gemma 3)."""
    import transformers

    from sftune.presets import PRESETS, package_dir

    preset = PRESETS[name]
    if package_dir(preset.package) is None:
        pytest.skip(f"{preset.package} is not installed ({preset.install})")
    with tempfile.TemporaryDirectory(prefix="sftune-gguf-") as scratch:
        gguf = preset.locate(Path(scratch))
        loader = getattr(transformers, tokenizer_class)
        return loader.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer and ChatML template, < 1 s (shared: do not mutate)."""
    return _preset_tokenizer("smollm2-135m", "PreTrainedTokenizerFast")


@pytest.fixture(scope="session")
def gemma3_tokenizer():
    """Gemma 3 270M's tokenizer (262k tokens, about 5 s; shared: do not mutate). The preset is
    the base model, whose GGUF carries no chat template."""
    return _preset_tokenizer("gemma3-270m", "GemmaTokenizer")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own SFTUNE_CACHE_DIR, so no test reads another's cache."""
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("sftune-cache")))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (2 layers, width 64) with a byte tokenizer, and an arithmetic SFT file."""
    root = tmp_path_factory.mktemp("train")
    from tiny import byte_tokenizer, tiny_model_dir

    tiny_model_dir(root / "model", byte_tokenizer())
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(160):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            # Prompts of varied length, so response-only micro-batches differ in trained tokens.
            pad = " please" * rng.randint(0, 6)
            f.write(
                json.dumps(
                    {"prompt": f"Add {a} and {b}{pad}.", "response": f"The answer is {a + b}."}
                )
                + "\n"
            )
    return root


@pytest.fixture(scope="session")
def gsm8k_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten GSM8K-shaped problems (question, worked answer ending in `#### N`), made here."""
    path = tmp_path_factory.mktemp("gsm8k") / "test.jsonl"
    rng = random.Random(1)
    with open(path, "w") as f:
        for _ in range(10):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            question = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
            answer = f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


@pytest.fixture(scope="session")
def short_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --task-dir with `gsm8k_short`: sftune's gsm8k (included) generating 16 tokens at most,
    so that a tiny random model, which never stops by itself, is scored in a second."""
    from sftune.tasks import SHIPPED_DIR

    folder = tmp_path_factory.mktemp("tasks")
    (folder / "gsm8k_short.yaml").write_text(
        f"include: {SHIPPED_DIR / 'gsm8k.yaml'}\ntask: gsm8k_short\n"
        "generation_kwargs: {until: ['### Instruction:'], do_sample: false, max_gen_toks: 16}\n"
    )
    return folder


@pytest.fixture(scope="session")
def fp64_run(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fp64 run of the tiny model (trainutil.tiny_config: 4 steps) that also kept its
    step-4 checkpoint: final/ and checkpoints/step_00000004 hold the same step. Read-only."""
    from sftune.train.loop import train
    from trainutil import tiny_config

    out = tmp_path_factory.mktemp("fp64") / "run"
    return train(tiny_config(workdir, out, save_every=4)).output_dir
