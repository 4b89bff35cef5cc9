"""The offline Llama 3 tokenizer gives Meta's ids."""

from __future__ import annotations

import importlib.util

import pytest

from sftune.errors import SftuneError
from sftune.llama3_tokenizer import LLAMA3_SPECIAL_TOKENS, build_llama3_tokenizer


def test_known_ids(llama3_tokenizer):
    ids = llama3_tokenizer("Below is an instruction that describes a task.")["input_ids"]
    assert ids == [128000, 39314, 374, 459, 7754, 430, 16964, 264, 3465, 13]


def test_special_tokens(llama3_tokenizer):
    tok = llama3_tokenizer
    assert (tok.bos_token, tok.bos_token_id) == ("<|begin_of_text|>", 128000)
    assert (tok.eos_token, tok.eos_token_id) == ("<|end_of_text|>", 128001)
    assert len(tok) == 128256
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    named = {"<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
    assert {t: tok.convert_tokens_to_ids(t) for t in named} == named
    assert tok.convert_ids_to_tokens(128255) == "<|reserved_special_token_245|>"
    # Special tokens in the text are single ids, not split into pieces.
    assert tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [128009]


def test_round_trip_and_split_pattern(llama3_tokenizer):
    text = "Hello world!\n\n12345 naïve — 'll ok"
    ids = llama3_tokenizer(text)["input_ids"]
    assert llama3_tokenizer.decode(ids, skip_special_tokens=True) == text
    # The Llama 3 pattern splits digits in groups of at most three.
    assert llama3_tokenizer.tokenize("12345") == ["123", "45"]


def test_saved_dir_loads_with_autotokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    assert tok("a b")["input_ids"][0] == 128000
    assert tok.eos_token_id == 128001


def test_missing_llama_models_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_models" else real(name, *a),
    )
    with pytest.raises(SftuneError, match="pip install llama-models"):
        build_llama3_tokenizer()
