import math

import pytest
import torch

from sftune.config import OptimConfig
from sftune.train.optim import build_optimizer, lr_factor, warmup_steps


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
