"""The course's per_instance_dpo_loss against the DPO loss written out by hand from logits, on two
different tiny random models in float64 (the course's own test needs hub weights)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sftune.dpo import encode_response, per_instance_dpo_loss
from sftune.objectives.preference import PairLogps, dpo
from tiny import build_tiny_model, byte_tokenizer
from trainutil import FP64_ATOL, FP64_RTOL

PROMPT = "What is 2 + 2?"
CHOSEN = "4"
REJECTED = "Five, I think."
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def setup():
    tok = byte_tokenizer()
    lm = build_tiny_model(len(tok), hidden=32, intermediate=64, seed=0, dtype=torch.float64)
    ref = build_tiny_model(len(tok), hidden=32, intermediate=64, seed=1, dtype=torch.float64)
    return tok, lm, ref


def _by_hand(model, tok, response: str) -> torch.Tensor:
    """Summed log-probs of the response and EOS after the Alpaca prompt, from the logits."""
    prompt_ids = tok(ALPACA.format(PROMPT))["input_ids"]  # BOS + prompt bytes
    ids = tok(ALPACA.format(PROMPT) + response)["input_ids"] + [tok.eos_token_id]
    assert ids[: len(prompt_ids)] == prompt_ids and ids[0] == tok.bos_token_id
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    total = torch.zeros((), dtype=torch.float64)
    for t in range(len(prompt_ids), len(ids)):
        total = total + F.log_softmax(logits[t - 1], -1)[ids[t]]
    return total


def test_matches_the_direct_computation(setup):
    tok, lm, ref = setup
    beta = 0.3
    got = per_instance_dpo_loss(lm, ref, tok, beta, PROMPT, CHOSEN, REJECTED)
    pc, pr = _by_hand(lm, tok, CHOSEN), _by_hand(lm, tok, REJECTED)
    with torch.no_grad():
        rc, rr = _by_hand(ref, tok, CHOSEN), _by_hand(ref, tok, REJECTED)
    expect = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    assert got.shape == () and got.dtype == torch.float64
    assert got.device == next(lm.parameters()).device
    torch.testing.assert_close(got, expect, rtol=FP64_RTOL, atol=FP64_ATOL)
    # The same four sums through objectives.dpo give the same loss.
    one = lambda x: x.detach().reshape(1)  # noqa: E731
    n = torch.ones(1)
    via = dpo(PairLogps(one(pc), one(pr), n, n), PairLogps(one(rc), one(rr), n, n), beta)
    torch.testing.assert_close(got.detach(), via.losses[0], rtol=FP64_RTOL, atol=FP64_ATOL)
    # The gradient reaches the policy, never the reference.
    got.backward()
    assert lm.lm_head.weight.grad is not None and lm.lm_head.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in ref.parameters())


def test_prompt_is_not_scored_and_eos_is(setup):
    tok, _, _ = setup
    ids, scored = encode_response(tok, PROMPT, REJECTED)
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    assert sum(scored) == len(REJECTED) + 1  # one byte token per character, plus the EOS
    assert scored[-(len(REJECTED) + 1) :] == [True] * (len(REJECTED) + 1)


def test_policy_equal_to_reference_gives_ln2(setup):
    tok, lm, _ = setup
    got = per_instance_dpo_loss(lm, lm, tok, 0.1, PROMPT, CHOSEN, REJECTED)
    assert got.item() == pytest.approx(math.log(2), rel=1e-15)


def test_swapping_the_responses_mirrors_the_margin(setup):
    tok, lm, ref = setup
    a = per_instance_dpo_loss(lm, ref, tok, 0.5, PROMPT, CHOSEN, REJECTED)
    b = per_instance_dpo_loss(lm, ref, tok, 0.5, PROMPT, REJECTED, CHOSEN)
    # a = -log s(x), b = -log s(-x) for the same margin x, and s(x) + s(-x) = 1.
    assert math.exp(-a.item()) + math.exp(-b.item()) == pytest.approx(1.0, rel=1e-14)
    assert a.item() != pytest.approx(b.item())
