"""Preference tuning on a GPU: FlexAttention's pair mask, compiled layers and the fused
token log-probs against the plain path (skipped without CUDA).

On a CUDA machine: `python -m pytest -q tests/test_gpu_dpo.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from test_dpo_train import _own_cache, _rows, _run, dpo_args, pairs  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU = ("--device", "cuda", "--dtype", "bf16-mixed")
PLAIN = ("--compile", "off", "--fused-loss", "off", "--attn", "sdpa")
FAST = ("--compile", "on", "--fused-loss", "on", "--attn", "flex_attention")


@pytest.mark.parametrize("lora", [(), ("--lora",)], ids=["full", "lora"])
def test_dpo_fast_path_matches_the_plain_path_on_gpu(workdir, pairs, tmp_path, capsys, lora):  # noqa: F811
    """Flex + compile + fused head against SDPA's bool mask with full logits, bf16 autocast:
    ln 2 at step 0 on both, and the same losses to bf16 rounding over 4 steps."""
    runs = {}
    for name, flags in (("plain", PLAIN), ("fast", FAST)):
        run = tmp_path / name
        extra = (*GPU, *flags, *lora, "--max-steps", "4", "--micro-batch-size", "2")
        code, out = _run([*dpo_args(workdir, pairs, run), *extra], capsys)
        assert code == 0, out
        runs[name] = run
        val = _rows(run, "val_loss")
        assert val[0]["val_loss"] == pytest.approx(math.log(2), abs=2e-3), name
    plain, fast = (
        {s: r["train_loss"] for s, r in _rows(runs[k], "train_loss").items()} for k in runs
    )
    assert plain.keys() == fast.keys() == {1, 2, 3, 4}
    for step in plain:
        assert fast[step] == pytest.approx(plain[step], abs=2e-2), step
    assert plain[4] != pytest.approx(plain[1], abs=1e-4)  # the policy moved off the reference
