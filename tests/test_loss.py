"""The fused chunked linear + cross-entropy equals the plain path, value and gradients.

The inputs are float64, so what is computed in fp64 is compared to fp64 rounding noise
(measured <= 4e-16 absolute, 1e-12 relative; fp32 differs by 1e-7 to 1e-4 relative). Two
results of the fused path pass through fp32 accumulators in loss.py whatever the inputs' dtype:
the loss (summed over chunks) and, with more than one chunk, the weight gradient; those agree to
fp32 resolution only.
"""

import pytest
import torch

from sftune.objectives.loss import IGNORE_INDEX, cross_entropy_sum, fused_linear_cross_entropy

FP64 = dict(rtol=1e-10, atol=1e-12)
FP32_SUM = dict(rtol=1e-5, atol=1e-7)  # a weight gradient summed over chunks in fp32


def _loss_rtol(loss: torch.Tensor) -> float:
    """Relative tolerance for a loss value: fp64 noise, or fp32 resolution for an fp32 result."""
    return 1e-12 if loss.dtype == torch.float64 else 1e-6


def _inputs(n=37, h=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [8, 64])  # 37 rows: five chunks, or one
def test_fused_matches_plain_value_and_grads(chunk_size):
    hidden, weight, labels = _inputs()
    scale = 1.0 / (labels != IGNORE_INDEX).sum()
    plain = cross_entropy_sum(hidden @ weight.t(), labels) * scale
    plain.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = fused_linear_cross_entropy(hidden, weight, labels, scale, chunk_size=chunk_size)
    (fused * 3.0).backward()  # the upstream gradient must be applied too
    assert torch.allclose(fused.double(), plain.double(), rtol=_loss_rtol(fused))
    assert torch.allclose(hidden.grad, 3.0 * gh, **FP64)
    one_chunk = chunk_size >= len(labels)
    assert torch.allclose(weight.grad, 3.0 * gw, **(FP64 if one_chunk else FP32_SUM))


def test_fused_all_ignored_gives_zero():
    hidden, weight, labels = _inputs()
    labels[:] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(hidden, weight, labels, 1.0, chunk_size=8)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_sum_not_mean_of_means():
    """Two micro-batches with different trained-token counts: the step loss is the token mean."""
    hidden, weight, labels = _inputs(n=20)
    labels[:15] = IGNORE_INDEX  # first micro-batch (rows 0-9): 0 trained; second: 5 trained
    total = (labels != IGNORE_INDEX).sum()
    parts = [
        fused_linear_cross_entropy(hidden[a:b], weight, labels[a:b], 1.0 / total)
        for a, b in ((0, 10), (10, 20))
    ]
    whole = cross_entropy_sum(hidden @ weight.t(), labels) / total
    assert torch.allclose(sum(parts).double(), whole.double(), rtol=_loss_rtol(parts[0]))


@pytest.mark.slow
def test_compiled_chunk_math_matches_eager():
    """The torch.compile'd softmax/gradient of a chunk computes the same loss and gradients,
    with one chunk (one weight-gradient GEMM) and with several (fp32 accumulation)."""
    for chunk in (64, 8):
        results = []
        for compiled in (False, True):
            hidden, weight, labels = _inputs()
            loss = fused_linear_cross_entropy(hidden, weight, labels, 0.1, chunk, compiled)
            loss.backward()
            results.append((loss.detach(), hidden.grad, weight.grad))
        (eager_loss, eager_gh, eager_gw), (loss, gh, gw) = results
        torch.testing.assert_close(loss, eager_loss, rtol=_loss_rtol(loss), atol=0)
        torch.testing.assert_close(gh, eager_gh, **FP64)
        torch.testing.assert_close(gw, eager_gw, **(FP64 if chunk >= len(labels) else FP32_SUM))


def test_no_grad_gives_the_same_loss():
    """Evaluation (no grad) takes a loss-only path: same value as training's."""
    hidden, weight, labels = _inputs()
    with_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.25, chunk_size=8)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.25, chunk_size=8)
    assert not no_grad.requires_grad
    # The loss-only path keeps the inputs' fp64; the training path returns its fp32 sum.
    rtol = max(_loss_rtol(no_grad), _loss_rtol(with_grad))
    assert torch.allclose(no_grad.double(), with_grad.detach().double(), rtol=rtol)
