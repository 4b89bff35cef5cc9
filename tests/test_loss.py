"""The fused chunked linear + cross-entropy equals the plain path, value and gradients."""

import torch

from sftune.train.loss import IGNORE_INDEX, cross_entropy_sum, fused_linear_cross_entropy


def _inputs(n=37, h=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


def test_fused_matches_plain_value_and_grads():
    hidden, weight, labels = _inputs()
    scale = 1.0 / (labels != IGNORE_INDEX).sum()
    plain = cross_entropy_sum(hidden @ weight.t(), labels) * scale
    plain.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    fused = fused_linear_cross_entropy(hidden, weight, labels, scale, chunk_size=8)
    (fused * 3.0).backward()  # the upstream gradient must be applied too
    assert torch.allclose(fused.double(), plain.double(), rtol=1e-6)
    assert torch.allclose(hidden.grad, 3.0 * gh, rtol=1e-5, atol=1e-7)
    assert torch.allclose(weight.grad, 3.0 * gw, rtol=1e-5, atol=1e-7)


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
    assert torch.allclose(sum(parts).double(), whole.double(), rtol=1e-6)


def test_compiled_chunk_math_matches_eager():
    """The torch.compile'd softmax/gradient of a chunk computes the same loss and gradients,
    with one chunk (one weight-gradient GEMM) and with several (fp32 accumulation)."""
    for chunk in (64, 8):
        results = []
        for compiled in (False, True):
            hidden, weight, labels = _inputs()
            hidden, weight = (t.detach().float().requires_grad_() for t in (hidden, weight))
            loss = fused_linear_cross_entropy(hidden, weight, labels, 0.1, chunk, compiled)
            loss.backward()
            results.append((loss.detach(), hidden.grad, weight.grad))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_grad_gives_the_same_loss():
    """Evaluation (no grad) takes a loss-only path: same value as training's."""
    hidden, weight, labels = _inputs()
    with_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.25, chunk_size=8)
    with torch.no_grad():
        no_grad = fused_linear_cross_entropy(hidden, weight, labels, 0.25, chunk_size=8)
    assert not no_grad.requires_grad
    assert torch.allclose(no_grad.double(), with_grad.detach().double(), rtol=1e-9)
