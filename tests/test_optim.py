import contextlib
import math

import pytest
import torch

from sftune.config import OptimConfig
from sftune.train.optim import build_optimizer, lr_factor, warmup_steps
from tiny import build_tiny_model
from trainutil import FP64_ATOL, FP64_RTOL


def test_warmup_then_cosine_to_min():
    total, warm = 100, warmup_steps(100, 0.03)
    assert warm == 3
    assert [lr_factor(s, total, warm, 0.0) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(3, total, warm, 0.0) == pytest.approx(1.0)
    mid = 3 + (total - 3) / 2
    assert lr_factor(int(mid), total, warm, 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 3) / 97))
    )
    assert lr_factor(total, total, warm, 0.1) == pytest.approx(0.1)


def test_no_weight_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt, sched = build_optimizer(
        list(model.parameters()), OptimConfig(weight_decay=0.1), 10, torch.device("cpu")
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def _train(compiled: bool, steps: int = 4, resume_at: int | None = None):
    """A tiny fp64 model trained with clip_and_step; optionally rebuilt from a state dict mid-way."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.05, warmup_ratio=0.5)
    model = build_tiny_model(32, seed=3, dtype=torch.float64)
    opt, sched = build_optimizer(
        list(model.parameters()), cfg, steps, torch.device("cpu"), compiled
    )
    g = torch.Generator().manual_seed(0)
    norms = []
    for step in range(steps):
        if step == resume_at:
            saved = (opt.state_dict(), sched.state_dict())
            opt, sched = build_optimizer(
                list(model.parameters()), cfg, steps, torch.device("cpu"), compiled
            )
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        x = torch.randint(0, 32, (4, 16), generator=g)
        model(x, labels=x).loss.backward()
        norms.append(float(opt.clip_and_step(cfg.grad_clip)))
        sched.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], norms, opt, sched


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.slow
def test_compiled_step_matches_eager_and_resumes():
    """Clipping + AdamW under torch.compile: same norms and weights as the eager optimizer,
    the scheduler moves the tensor learning rate, and a reloaded state continues the same."""
    # fp64 scalars too: the compiled (capturable) AdamW holds the learning rate and the step
    # count as tensors of the default dtype, and as fp32 their rounding alone moves the weights
    # 1e-5 away from eager's Python-float math. In fp64: 3e-16 (measured), 1e-16 on the norms.
    with _default_dtype(torch.float64):
        eager_w, eager_n, _, eager_sched = _train(compiled=False)
        comp_w, comp_n, opt, sched = _train(compiled=True)
    assert comp_n == pytest.approx(eager_n, rel=1e-12)
    assert eager_n[0] > 0.05  # clipping was active
    for a, b in zip(eager_w, comp_w, strict=True):
        torch.testing.assert_close(a, b, rtol=FP64_RTOL, atol=FP64_ATOL)  # steps are 1e-2
    assert torch.is_tensor(opt.param_groups[0]["lr"])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(eager_sched.get_last_lr()[0])
    # A run and its resumed copy on one machine are bit-identical by construction. The default
    # dtype stays fp32 here: torch's load_state_dict casts a capturable step count to fp32,
    # which would not continue an fp64 one exactly.
    comp_w, comp_n, _, _ = _train(compiled=True)
    resumed_w, resumed_n, _, _ = _train(compiled=True, resume_at=2)
    assert resumed_n == comp_n
    for a, b in zip(comp_w, resumed_w, strict=True):
        assert torch.equal(a, b)
