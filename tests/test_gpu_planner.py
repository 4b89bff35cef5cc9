"""The memory planner on a real GPU (issue 26; skipped without CUDA): where nothing fits, the
longest length it names does fit, under the same cap and the same margin.

On a CUDA machine: `python -m pytest -q tests/test_gpu_planner.py`.
"""

from __future__ import annotations

import re

import pytest
import torch

from sftune import config as config_mod
from sftune.errors import SftuneError
from sftune.train.distributed import World
from sftune.train.module import build_module, gpu_budget, plan_memory
from sftune.train.optim import build_optimizer
from sftune.transforms import memplan
from tiny import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB = 256


def test_the_longest_length_named_fits_the_cap():
    """A 4-layer model at 256K tokens in 0.25 GiB: its checkpointed layer inputs alone are
    0.5 GiB, so nothing fits; the length the error names then trains within the cap."""
    device, seq = torch.device("cuda"), 2**18
    model = build_tiny_model(VOCAB, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024)
    model = model.to(device=device, dtype=torch.bfloat16)
    cfg = config_mod.from_flat(dict(compile="off", fused_loss="on", device="cuda"))
    module = build_module(cfg, model, device, World()).module
    opt, _ = build_optimizer(list(module.parameters()), cfg.optim, 1, device)
    sizes = dict(per_rank_batch=1, vocab_size=VOCAB, device=device)
    try:
        budget = gpu_budget(device, 0.25)
        with pytest.raises(SftuneError) as e:
            plan_memory(
                module, opt, seq_length=seq, budget_bytes=budget, checkpointing=True, **sizes
            )
        msg = str(e.value)
        assert "\n" not in msg and "even at micro-batch 1 x 262,144 tokens" in msg
        longest = int(re.search(r"--seq-length (\d+)", msg).group(1))
        assert 1024 <= longest < seq
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, VOCAB, (1, longest), device=device)
        module(input_ids=ids, labels=ids, scale=1.0 / ids.numel()).backward()
        assert torch.cuda.max_memory_allocated(device) < memplan.FIT_SHARE * budget
        opt.zero_grad(set_to_none=True)
        # And the plan at that length succeeds, with checkpointing.
        plan = plan_memory(
            module, opt, seq_length=longest, budget_bytes=budget, checkpointing=True, **sizes
        )
        assert plan.micro_batch == 1 and plan.checkpointing
    finally:
        model.gradient_checkpointing_disable()
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
