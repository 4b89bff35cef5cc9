"""The preference losses against hand-written formulas, the per-token log-probs of the chunked
head, and the step loss's independence of how its pairs are split into micro-batches (fp64)."""

import math

import pytest
import torch

from sftune.objectives.loss import IGNORE_INDEX, fused_linear_token_logprobs
from sftune.objectives.preference import (
    METRICS,
    PairLogps,
    loss_share,
    metric_means,
    metric_sums,
    pair_logps,
    pair_loss,
)
from tiny import build_tiny_model
from trainutil import FP64_ATOL, FP64_RTOL

FP64 = dict(rtol=FP64_RTOL, atol=FP64_ATOL)


def _fixed() -> tuple[PairLogps, PairLogps]:
    """Two pairs with fixed numbers: policy and reference summed log-probs and token counts."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    policy = PairLogps(t(-10.0, -4.0), t(-12.0, -3.0), t(5.0, 2.0), t(4.0, 3.0))
    ref = PairLogps(t(-11.0, -5.0), t(-11.5, -2.0), t(5.0, 2.0), t(4.0, 3.0))
    return policy, ref


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_matches_hand_formula():
    policy, ref = _fixed()
    out = pair_loss("dpo", policy, ref, beta=0.1)
    # Pair 0: h = (-10 + 12) - (-11 + 11.5) = 1.5; pair 1: h = (-4 + 3) - (-5 + 2) = 2.
    assert out.losses.tolist() == pytest.approx([-_logsig(0.15), -_logsig(0.2)], rel=1e-14)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.1], rel=1e-14)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, -0.1], rel=1e-14)
    means = metric_means(metric_sums(out), 2)
    assert list(means) == list(METRICS)
    assert means["rewards/accuracies"] == 1.0
    assert means["rewards/margins"] == pytest.approx((0.15 + 0.2) / 2, rel=1e-14)
    assert means["logps/chosen"] == -7.0 and means["logps/rejected"] == -7.5


def test_ipo_averages_per_token():
    policy, ref = _fixed()
    out = pair_loss("ipo", policy, ref, beta=0.25)
    h0 = (-10 / 5 + 12 / 4) - (-11 / 5 + 11.5 / 4)
    h1 = (-4 / 2 + 3 / 3) - (-5 / 2 + 2 / 3)
    expect = [(h - 1 / (2 * 0.25)) ** 2 for h in (h0, h1)]
    assert out.losses.tolist() == pytest.approx(expect, rel=1e-13)
    assert out.chosen_rewards[0].item() == pytest.approx(0.25 * (-2 + 2.2), rel=1e-13)
    assert out.chosen_logps.tolist() == [-2.0, -2.0]  # TRL logs the averaged log-probs


def test_simpo_reference_free_with_margin():
    policy, _ = _fixed()
    out = pair_loss("simpo", policy, None, beta=2.0, gamma=0.5)
    a = [(-10 / 5, -12 / 4), (-4 / 2, -3 / 3)]
    assert out.losses.tolist() == pytest.approx(
        [-_logsig(2.0 * (c - r) - 0.5) for c, r in a], rel=1e-13
    )
    assert out.rejected_rewards.tolist() == pytest.approx([2.0 * r for _, r in a], rel=1e-14)


def test_orpo_odds_ratio_plus_chosen_nll():
    policy, _ = _fixed()
    out = pair_loss("orpo", policy, None, beta=0.1)
    a = [(-10 / 5, -12 / 4), (-4 / 2, -3 / 3)]
    odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in a]
    assert out.losses.tolist() == pytest.approx([-0.1 * _logsig(o) for o in odds], rel=1e-13)
    # The step loss adds the chosen NLL token-weighted over the step: (10 + 4) / (5 + 2).
    share = loss_share(out, policy, 2, 7)
    assert share.item() == pytest.approx(sum(-0.1 * _logsig(o) for o in odds) / 2 + 2.0, rel=1e-13)


def test_nll_weight_adds_token_weighted_chosen_nll():
    policy, ref = _fixed()
    plain = loss_share(pair_loss("dpo", policy, ref, beta=0.1), policy, 2, 7)
    rpo = loss_share(pair_loss("dpo", policy, ref, beta=0.1, nll_weight=0.5), policy, 2, 7)
    assert (rpo - plain).item() == pytest.approx(0.5 * 14 / 7, rel=1e-13)


def test_policy_equal_to_reference_gives_ln2_zero_margin_zero_accuracy():
    policy, _ = _fixed()
    out = pair_loss("dpo", policy, policy, beta=0.1)
    assert loss_share(out, policy, 2, 7).item() == pytest.approx(math.log(2), rel=1e-15)
    means = metric_means(metric_sums(out), 2)
    assert means["rewards/margins"] == 0.0 and means["rewards/accuracies"] == 0.0


def test_pair_logps_sums_by_pair_and_side():
    t = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], dtype=torch.float64)
    pair = torch.tensor([-1, 0, 0, 1, 0, 1])
    chosen = torch.tensor([False, True, False, True, True, False])
    out = pair_logps(t, pair, chosen, 2)
    assert out.chosen.tolist() == [-7.0, -4.0] and out.rejected.tolist() == [-3.0, -6.0]
    assert out.chosen_tokens.tolist() == [2.0, 1.0] and out.rejected_tokens.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("chunk_size", [7, 64])  # 37 rows: six chunks, or one
def test_token_logprobs_match_log_softmax(chunk_size):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(53, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 53, (37,), generator=g)
    labels[::5] = IGNORE_INDEX
    upstream = torch.randn(37, generator=g, dtype=torch.float64)
    valid = labels != IGNORE_INDEX
    plain = torch.log_softmax(hidden @ weight.t(), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    plain = plain * valid
    (plain * upstream).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = fused_linear_token_logprobs(hidden, weight, labels, chunk_size=chunk_size)
    (fused * upstream).sum().backward()
    torch.testing.assert_close(fused, plain, **FP64)
    torch.testing.assert_close(hidden.grad, gh, **FP64)
    torch.testing.assert_close(weight.grad, gw, **FP64)


def _pairs(n=8, seed=0):
    """n pairs of token sequences (prompt, chosen, rejected), of varied lengths."""
    g = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> torch.Tensor:
        length = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(0, 50, (length,), generator=g)

    return [(rand(3, 7), rand(1, 6), rand(2, 9)) for _ in range(n)]


def _micro_batch_logps(model, pairs) -> PairLogps:
    """Per-pair summed log-probs of the responses, from the chunked head over hidden states."""
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for response, is_chosen in ((chosen, True), (rejected, False)):
            ids = torch.cat([prompt, response])
            hidden = model.model(input_ids=ids[None]).last_hidden_state[0, :-1]
            labels = ids[1:].clone()
            labels[: len(prompt) - 1] = IGNORE_INDEX
            logps = fused_linear_token_logprobs(hidden, model.lm_head.weight, labels, chunk_size=4)
            index = torch.where(labels == IGNORE_INDEX, -1, i)
            rows.append((logps, index, torch.full_like(labels, is_chosen, dtype=torch.bool)))
    cat = [torch.cat(parts) for parts in zip(*rows, strict=True)]
    return pair_logps(*cat, num_pairs=len(pairs))


def _step_grads(model, ref_model, pairs, split: int, objective: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    step_pairs = len(pairs)
    step_chosen = sum(len(c) for _, c, _ in pairs)
    for start in range(0, len(pairs), split):
        batch = pairs[start : start + split]
        policy = _micro_batch_logps(model, batch)
        with torch.no_grad():
            ref = _micro_batch_logps(ref_model, batch)
        out = pair_loss(objective, policy, ref, beta=0.5, gamma=0.3, nll_weight=0.7)
        loss_share(out, policy, step_pairs, step_chosen).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_accumulation_does_not_change_the_gradient(objective):
    model = build_tiny_model(64, hidden=16, intermediate=32, seed=0, dtype=torch.float64)
    ref_model = build_tiny_model(64, hidden=16, intermediate=32, seed=1, dtype=torch.float64)
    pairs = _pairs()
    one = _step_grads(model, ref_model, pairs, 8, objective)
    four = _step_grads(model, ref_model, pairs, 2, objective)
    assert any(g.abs().max() > 0 for g in one.values())
    for name, grad in one.items():
        torch.testing.assert_close(four[name], grad, **FP64, msg=name)


def test_orpo_stays_finite_for_a_likely_chosen_response():
    # Averaged log-prob -1e-12: 1 - e^a rounds to 1e-12 with 4 digits lost in log1p(-exp(a)).
    t = lambda *v: torch.tensor(v, dtype=torch.float64, requires_grad=True)  # noqa: E731
    n = torch.ones(1, dtype=torch.float64)
    policy = PairLogps(t(-1e-12), t(-2.0), n, n)
    out = pair_loss("orpo", policy, None, beta=0.1)
    c, r = -1e-12, -2.0
    odds = (c - r) - (math.log(-math.expm1(c)) - math.log1p(-math.exp(r)))
    assert out.losses.item() == pytest.approx(-0.1 * _logsig(odds), rel=1e-14)
    loss_share(out, policy, 1, 1).backward()
    assert torch.isfinite(policy.chosen.grad).all()
