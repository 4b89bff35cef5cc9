"""Tiled MLP on a GPU (skipped without CUDA): in bf16 it keeps the plain MLP's loss and
gradients to bf16 rounding, and at 16K tokens it lowers the peak by at least three of the
(tokens x intermediate) tensors that the untiled MLP's backward holds.

On a CUDA machine: `python -m pytest -q tests/test_gpu_tiling.py`.
"""

from __future__ import annotations

import pytest
import torch

from sftune import config as config_mod
from sftune.train.distributed import World
from sftune.train.module import build_module
from sftune.transforms import tiling
from tiny import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# Tiny but wide: the MLP's intermediate is 64x the hidden size, so at 16K tokens one
# (tokens x intermediate) bf16 tensor is 512 MiB while the whole model is 60 MiB.
VOCAB, HIDDEN, INTER, SEQ, TILE = 2048, 256, 16384, 16384, 2048
# bf16 keeps 8 significant bits (unit roundoff 2**-9). A tile's GEMMs may round otherwise than
# the whole sequence's (another kernel for another shape), and the weights' gradients are sums
# of 8 tiles' in bf16 (as micro-batches are summed into .grad): the loss, a mean over 16K
# tokens, agrees far closer than one rounding; each gradient tensor to a few roundings of its
# norm.
LOSS_RTOL, GRAD_RTOL = 2e-3, 2e-2


def _model(dtype: str = "bf16") -> torch.nn.Module:
    """bf16 weights, or fp32 ones for bf16-mixed (autocast)."""
    model = build_tiny_model(
        VOCAB, hidden=HIDDEN, layers=2, heads=4, kv_heads=2, intermediate=INTER, max_position=SEQ
    )
    weights = torch.bfloat16 if dtype == "bf16" else torch.float32
    return model.to(device="cuda", dtype=weights)


def _module(model, tiled: bool, compile_: str = "off", dtype: str = "bf16"):
    cfg = config_mod.from_flat(
        dict(
            seq_length=SEQ,
            dtype=dtype,
            batch_size=1,
            micro_batch_size=1,
            activation_checkpointing=True,  # the long-sequence path: layers recomputed
            compile=compile_,
            fused_loss="on",
            device="cuda",
            tiled_mlp="on" if tiled else "off",
            tiled_mlp_chunk=TILE,
        )
    )
    built = build_module(cfg, model, torch.device("cuda"), World())
    assert tiling.enabled(model) == tiled
    return built.module


def _step(module, ids: torch.Tensor):
    """(loss, gradients on the CPU in fp32, peak bytes allocated during forward+backward)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = module(input_ids=ids, labels=ids, scale=1.0 / ids.numel())
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    grads = {n: p.grad.float().cpu() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return float(loss), grads, peak


def _assert_close(plain, tiled):
    (loss_p, grads_p, _), (loss_t, grads_t, _) = plain, tiled
    assert loss_t == pytest.approx(loss_p, rel=LOSS_RTOL)
    assert grads_t.keys() == grads_p.keys()
    for k in grads_p:
        err = (grads_t[k] - grads_p[k]).norm() / grads_p[k].norm().clamp_min(1e-30)
        assert err <= GRAD_RTOL, (k, float(err))


@pytest.mark.parametrize("dtype", ["bf16", "bf16-mixed"])
def test_bf16_same_loss_and_gradients_and_a_lower_peak_at_16k(dtype):
    """bf16 weights, or fp32 weights under bf16 autocast (whose backward recomputes the tiles
    under the forward's autocast): the plain MLP's loss and gradients, a lower peak."""
    model = _model(dtype)
    ids = torch.randint(0, VOCAB, (1, SEQ), device="cuda")
    plain = _step(_module(model, tiled=False, dtype=dtype), ids)
    tiled = _step(_module(model, tiled=True, dtype=dtype), ids)
    _assert_close(plain, tiled)
    # Untiled, the recomputed layer's MLP saves gate, up, silu(gate) and their product, each
    # SEQ x INTER bf16 (512 MiB); tiled, one tile's worth (64 MiB each). At least three of them
    # must be gone from the peak.
    one = SEQ * INTER * 2
    saved = plain[2] - tiled[2]
    assert saved >= 3 * one, (plain[2] / 2**30, tiled[2] / 2**30)


def test_compiled_layers_with_tiled_mlp_match_eager():
    """--compile on: the layers compile around the tiled MLP (which runs eagerly) and give the
    eager model's loss and gradients."""
    model = _model()
    ids = torch.randint(0, VOCAB, (1, SEQ // 4), device="cuda")
    eager = _step(_module(model, tiled=True), ids)
    torch._dynamo.reset()
    compiled = _step(_module(model, tiled=True, compile_="on"), ids)
    torch._dynamo.reset()
    _assert_close(eager, compiled)
