"""Pairs packed as prompt | chosen | rejected (sftune.data.pairs): the layout, the cuts, and the
log-probs of a packed row equal to those of the two separate sequences, in float64."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sftune
from sftune.data.pairs import (
    attention_mask_4d,
    dense_mask,
    flex_block_mask,
    pack_pairs,
    sum_by_pair,
    summary,
)
from sftune.errors import ConfigError, DataError
from tiny import build_tiny_model

# The module doc's worked example, with token ids: A B = 1 2, c1 c2 = 3 4, r1 r2 r3 = 5 6 9;
# pair 1: D = 7, d1 = 8, e1 e2 = 10 11; padding 0.
EXAMPLE = (
    [np.array([1, 2]), np.array([7])],
    [np.array([3, 4]), np.array([8])],
    [np.array([5, 6, 9]), np.array([10, 11])],
)


def test_worked_example_layout():
    packed = pack_pairs(*EXAMPLE, seq_length=8, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 9, 0], [7, 8, 10, 11, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0], [0, 1, 1, 2, 0, 0, 0, 0]]
    assert packed.segment.tolist() == [[0, 0, 1, 1, 2, 2, 2, -1], [3, 4, 5, 5, -1, -1, -1, -1]]
    assert packed.pair.tolist() == [[0, 0, 0, 0, 0, 0, 0, -1], [1, 1, 1, 1, -1, -1, -1, -1]]
    assert packed.source.tolist() == [[-1, -1, 1, 2, 1, 4, 5, -1], [-1, 0, 0, 2, -1, -1, -1, -1]]
    assert packed.stats == {
        "pairs": 2,
        "rows": 2,
        "seq_length": 8,
        "tokens": 11,
        "padding": 5,
        "prompt_tokens_saved": 3,
        "truncated": 0,
        "prompt_cut": 0,
        "responses_cut": 0,
    }
    assert "cut to fit: 0" in summary(packed.stats)


def test_worked_example_mask():
    drawn = """
        1 . . . . . . .
        1 1 . . . . . .
        1 1 1 . . . . .
        1 1 1 1 . . . .
        1 1 . . 1 . . .
        1 1 . . 1 1 . .
        1 1 . . 1 1 1 .
        . . . . . . . 1
    """
    expected = np.array([[ch == "1" for ch in line.split()] for line in drawn.split("\n")[1:-1]])
    packed = pack_pairs(*EXAMPLE, seq_length=8, pad_id=0)
    mask = dense_mask(packed.segment)
    assert mask.shape == (2, 8, 8)
    np.testing.assert_array_equal(mask[0], expected)
    # Row 1: pair 1 (D d1 e1 e2); e1 sees D and itself, not d1; padding only itself.
    assert mask[1, 2].tolist() == [True, False, True, False, False, False, False, False]
    np.testing.assert_array_equal(mask[1, 4:, :], np.eye(8, dtype=bool)[4:])
    # The forms transformers takes: bool (sdpa) and additive (eager), both (rows, 1, L, L).
    as_bool = attention_mask_4d(packed.segment)
    additive = attention_mask_4d(packed.segment, torch.float64)
    assert as_bool.shape == additive.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(as_bool[:, 0].numpy(), mask)
    assert set(additive[as_bool].tolist()) == {0.0}
    assert set(additive[~as_bool].tolist()) == {torch.finfo(torch.float64).min}


def test_targets_flatten_the_scored_tokens():
    packed = pack_pairs(*EXAMPLE, seq_length=8, pad_id=0)
    t = packed.targets([1, 0])  # rows in any order; pairs are numbered in ascending order
    # Row 1 comes first (flat indices 0..7), row 0 second (8..15).
    assert t["source"].tolist() == [0, 0, 2, 9, 10, 9, 12, 13]
    assert t["target"].tolist() == [8, 10, 11, 3, 4, 5, 6, 9]
    assert t["pair"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert t["side"].tolist() == [0, 1, 1, 0, 0, 1, 1, 1]
    assert t["pairs"].tolist() == [0, 1]


def _pair(p, c, r):
    return [np.arange(1, p + 1)], [np.arange(100, 100 + c)], [np.arange(200, 200 + r)]


@pytest.mark.parametrize(
    ("mode", "lengths", "kept"),
    [
        ("keep-start", (3, 4, 9), (3, 4, 5)),  # the longer response loses its tail
        ("keep-start", (4, 8, 6), (4, 4, 4)),  # both cut to half the room
        ("keep-end", (9, 3, 2), (7, 3, 2)),  # the prompt's head goes
        ("keep-end", (5, 9, 9), (1, 6, 5)),  # one prompt token, then the responses' tails
    ],
)
def test_truncation_modes(mode, lengths, kept):
    packed = pack_pairs(*_pair(*lengths), seq_length=12, pad_id=0, truncation=mode)
    seg = packed.segment[0]
    assert [int(np.sum(seg == part)) for part in (0, 1, 2)] == list(kept)
    ids = packed.input_ids[0]
    p, c, r = (np.flatnonzero(seg == part) for part in (0, 1, 2))
    full_p = np.arange(1, lengths[0] + 1)
    expected_p = full_p[: kept[0]] if mode == "keep-start" else full_p[len(full_p) - kept[0] :]
    assert ids[p].tolist() == expected_p.tolist()
    assert ids[c].tolist() == list(range(100, 100 + kept[1]))  # responses keep their start
    assert ids[r].tolist() == list(range(200, 200 + kept[2]))
    assert packed.stats["truncated"] == 1
    assert packed.stats["prompt_cut"] == int(kept[0] < lengths[0])
    assert packed.stats["responses_cut"] == int(kept[1] + kept[2] < lengths[1] + lengths[2])
    assert "cut to fit: 1 " in summary(packed.stats)


def test_overlong_pair_is_refused_with_its_line():
    prompts, chosen, rejected = _pair(3, 4, 9)
    prompts.insert(0, np.array([1]))
    chosen.insert(0, np.array([2]))
    rejected.insert(0, np.array([3]))
    with pytest.raises(DataError) as err:
        pack_pairs(prompts, chosen, rejected, 12, pad_id=0, path="pairs.jsonl", lines=[1, 7])
    assert str(err.value).startswith("pairs.jsonl:7: a pair of 16 tokens (prompt 3, chosen 4")
    assert "--truncation keep-start or keep-end" in str(err.value)
    with pytest.raises(DataError, match=r"pairs.jsonl:7: .*no room for the responses.*keep-end"):
        pack_pairs(
            *_pair(11, 2, 2), 12, pad_id=0, truncation="keep-start", path="pairs.jsonl", lines=[7]
        )
    with pytest.raises(ConfigError, match="truncation: 'cut' is not one of refuse, keep-start"):
        pack_pairs(*_pair(3, 4, 9), 12, pad_id=0, truncation="cut")
    with pytest.raises(DataError, match="the rejected has no tokens"):
        pack_pairs([np.array([1])], [np.array([2])], [np.array([], int)], 12, pad_id=0)


def _random_pairs(rng, count, vocab):
    def ids(lo, hi):
        return rng.integers(0, vocab, size=int(rng.integers(lo, hi)))

    return (
        [ids(1, 9) for _ in range(count)],
        [ids(1, 8) for _ in range(count)],
        [ids(1, 8) for _ in range(count)],
    )


def _separate_logps(model, prompts, chosen, rejected):
    """(pairs, 2): each response's summed log-probs from its own sequence prompt + response."""
    out = []
    for p, *responses in zip(prompts, chosen, rejected, strict=True):
        sums = []
        for resp in responses:
            seq = torch.from_numpy(np.concatenate([p, resp]))[None]
            logp = model(input_ids=seq).logits[0].log_softmax(-1)
            at = torch.arange(len(p) - 1, len(seq[0]) - 1)
            sums.append(logp[at, seq[0, at + 1]].sum())
        out.append(torch.stack(sums))
    return torch.stack(out)


def _packed_logps(model, packed, attention_mask):
    rows = np.arange(packed.input_ids.shape[0])
    b = packed.batch(rows)
    logits = model(
        input_ids=torch.from_numpy(b["input_ids"]),
        position_ids=torch.from_numpy(b["position_ids"]),
        attention_mask=attention_mask,
    ).logits
    t = {k: torch.from_numpy(v) for k, v in packed.targets(rows).items()}
    logp = logits.log_softmax(-1).flatten(0, 1)[t["source"], t["target"]]
    return sum_by_pair(logp, t["pair"], t["side"], len(t["pairs"]))


@pytest.fixture(scope="module")
def fp64_case():
    vocab = 61
    rng = np.random.default_rng(0)
    pairs = _random_pairs(rng, 9, vocab)
    packed = pack_pairs(*pairs, seq_length=24, pad_id=0)
    assert packed.stats["rows"] >= 2 and packed.stats["padding"] > 0  # several rows, padded
    assert (np.bincount(packed.pair[packed.pair >= 0]) > 0).all()
    model = build_tiny_model(vocab, dtype=torch.float64, seed=3).eval()
    with torch.no_grad():
        return model, pairs, packed, _separate_logps(model, *pairs)


def test_packed_logps_equal_two_separate_sequences_fp64(fp64_case):
    model, pairs, packed, expected = fp64_case
    assert model.config._attn_implementation == "sdpa"
    mask = attention_mask_4d(packed.segment)  # bool, True = attend: sdpa's attn_mask
    assert mask.dtype == torch.bool and mask.shape == (packed.stats["rows"], 1, 24, 24)
    with torch.no_grad():
        got = _packed_logps(model, packed, mask)
        wrong = _packed_logps(model, packed, None)
    assert got.shape == (9, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Without the rule (plain causal attention over the row), the log-probs are different:
    assert (wrong - expected).abs().max() > 1e-3


def _rms_norm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm without its round trip through fp32 (the same math in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_packed_gradients_equal_two_separate_sequences_fp64(fp64_case, monkeypatch):
    """The gradient that trains the policy, of a weighted sum of every pair's log-probs.

    transformers' LlamaRMSNorm computes in fp32 even in an fp64 model. The forward is per token,
    so packed and separate round alike; but the gradient of a shared prompt token is the sum of
    its chosen and rejected branches, rounded through the fp32 norm once, where the separate
    sequences round each branch and add them in fp64 (1e-7 apart, measured). The test runs the
    norm in the model's dtype; the packed layout is unchanged."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model, pairs, packed, _ = fp64_case
    weights = torch.from_numpy(np.random.default_rng(1).normal(size=(9, 2)))

    def grads(logps_fn):
        model.zero_grad()
        (logps_fn() * weights).sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    expected = grads(lambda: _separate_logps(model, *pairs))
    got = grads(lambda: _packed_logps(model, packed, attention_mask_4d(packed.segment)))
    model.zero_grad()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_logps_through_flex_attention_fp64(fp64_case, monkeypatch):
    """transformers compiles flex_attention, and the CPU kernel refuses fp64 ('torch.float,
    torch.float16 and torch.bfloat16 are supported in FlexAttention for CPU device'): the test
    calls torch's flex_attention uncompiled (its reference path) with the same BlockMask."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    model, pairs, packed, expected = fp64_case

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)
    model.set_attn_implementation("flex_attention")
    try:
        block_mask = flex_block_mask(torch.from_numpy(packed.segment.astype(np.int64)))
        with torch.no_grad():
            got = _packed_logps(model, packed, block_mask)
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_module_imports_no_torch():
    src = Path(sftune.__file__).resolve().parents[1]
    code = "import sys, sftune.data.pairs; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(src)}, check=False)
    assert done.returncode == 0
