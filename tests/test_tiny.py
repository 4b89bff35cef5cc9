"""The test helpers in tests/tiny.py: a seeded tiny Llama and a byte-level tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from tiny import BOS, EOS, build_tiny_model, byte_tokenizer


def test_build_tiny_model_is_seeded_and_fp32():
    a, b = build_tiny_model(300, seed=1), build_tiny_model(300, seed=1)
    assert a.dtype == torch.float32
    wide = build_tiny_model(300, seed=1, dtype=torch.float64)  # the same weights, in fp64
    assert wide.dtype == torch.float64
    assert torch.equal(wide.lm_head.weight, a.lm_head.weight.double())
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert not torch.equal(a.lm_head.weight, build_tiny_model(300, seed=2).lm_head.weight)


def test_byte_tokenizer_round_trip(tmp_path):
    tokenizer = byte_tokenizer(tmp_path)
    assert len(tokenizer) == 259
    text = "Héllo, wörld!\n  tabs\tand ünïcode ✓"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids(BOS)
    assert ids[1:] == list(text.encode("utf-8"))  # one token per byte, id == byte value
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == 257
    assert tokenizer.pad_token_id == 258
    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded(text).input_ids == ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id
