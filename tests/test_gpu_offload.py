"""--activation-offload on a GPU (skipped without CUDA): pinned host memory, the side stream and
the prefetch keep the numbers of plain checkpointing, eager (exactly), with compiled layers and
under FSDP2 (bf16, to the tolerance of tests/test_gpu.py), and the peak memory drops by the
layer inputs it moved.

On a CUDA machine: `python -m pytest -q tests/test_gpu_offload.py -s` (-s prints the peaks and
timings).
"""

from __future__ import annotations

import time

import pytest
import torch

from sftune import config as config_mod
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.module import build_module, set_checkpointing
from sftune.train.optim import build_optimizer
from sftune.train.step import train_step
from sftune.transforms import offload
from tiny import build_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

VOCAB, SEQ, BATCH, STEPS, LAYERS = 2048, 512, 8, 5, 4


def _losses(offload_: str, compile_: str, dist: str = "auto", micro: int = 4) -> list[float]:
    """Losses of a few bf16 steps of a small model, every layer checkpointed (plain or
    offloaded), with accumulation (2 micro-batches a step)."""
    device = torch.device("cuda")
    model = build_tiny_model(
        VOCAB, hidden=256, layers=LAYERS, heads=8, kv_heads=4, intermediate=512, seed=0
    ).to(device=device, dtype=torch.bfloat16)
    cfg = config_mod.from_flat(
        dict(
            seq_length=SEQ,
            batch_size=BATCH,
            micro_batch_size=micro,
            lr=1e-3,
            compile=compile_,
            fused_loss="on",
            device="cuda",
            dist=dist,
            activation_checkpointing=offload_ == "off",
            activation_offload=offload_,
        )
    )
    module = build_module(cfg, model, device, World()).module
    assert offload.enabled(model) == (offload_ == "on")
    opt, sched = build_optimizer(list(module.parameters()), cfg.optim, STEPS, device)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        stream = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
        ids, labels = stream[:, :-1], stream[:, 1:].clone()
        labels[:, :40] = -100
        mbs = [
            {"input_ids": ids[i : i + micro].to(device), "labels": labels[i : i + micro].to(device)}
            for i in range(0, BATCH, micro)
        ]
        loss = train_step(module, opt, sched, mbs, grad_clip=cfg.optim.grad_clip)[0]
        out.append(float(loss))
    if offload_ == "on":
        moved = offload.offloader(model)
        passes = STEPS * BATCH // micro
        assert moved.packed == moved.unpacked == passes * LAYERS
        assert moved.prefetched == passes * (LAYERS - 1)
        assert moved.prefetched_bytes == moved.packed_bytes // LAYERS * (LAYERS - 1)
    return out


def test_eager_offload_is_plain_checkpointing_exactly():
    """The same kernels on the same values: a copy out and back changes no bit, unless a
    stream race read a buffer too early."""
    assert _losses("on", "off") == _losses("off", "off")


def test_compiled_layers_and_fsdp2_with_offload_train_like_plain_checkpointing():
    """Compiled layers (the offloader compiles each layer's forward: other graphs than a
    compiled plain checkpoint, so bf16 rounding differs: rel 1e-2 as in test_gpu.py), and FSDP2
    in a one-process NCCL group, compiled and offloaded."""
    plain = _losses("off", "on")
    compiled = _losses("on", "on")
    assert compiled == pytest.approx(plain, rel=1e-2), (plain, compiled)
    distributed.init("cuda", group=True)
    try:
        fsdp = _losses("on", "on", dist="fsdp")
        fsdp_eager = _losses("on", "off", dist="fsdp")
    finally:
        distributed.shutdown()
    assert fsdp == pytest.approx(plain, rel=1e-2), (plain, fsdp)
    assert fsdp_eager == pytest.approx(plain, rel=1e-2), (plain, fsdp_eager)


def _peak_and_time(how: str, seq: int, layers: int, hidden: int) -> tuple[int, float]:
    """Peak allocated bytes of one forward+backward at batch 1 x seq (after a warm-up pass,
    gradients kept), and its time (mean of 3)."""
    device = torch.device("cuda")
    model = build_tiny_model(
        VOCAB,
        hidden=hidden,
        layers=layers,
        heads=16,
        kv_heads=4,
        intermediate=hidden,
        max_position=seq,
        seed=0,
    ).to(device=device, dtype=torch.bfloat16)
    model.train()
    if how == "offload":
        offload.apply(model, True)
    else:
        set_checkpointing(model, True)
    ids = torch.randint(0, VOCAB, (1, seq), device=device)

    def step(model=model, ids=ids):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / 3
    peak = torch.cuda.max_memory_allocated() - base
    del model, ids, step
    torch.cuda.empty_cache()
    return peak, elapsed


def test_offload_lowers_the_peak_by_the_layer_inputs_at_8k():
    """A tiny-wide model (24 layers of width 2048, seq 8K): plain checkpointing holds all 24
    layer inputs (32 MiB each) when backward starts; offload at most two (the one in use, the
    one prefetched). The peak must drop by at least the other 22."""
    seq, layers, hidden = 8192, 24, 2048
    plain, t_plain = _peak_and_time("checkpointing", seq, layers, hidden)
    off, t_off = _peak_and_time("offload", seq, layers, hidden)
    per_layer = seq * hidden * 2  # bf16
    print(
        f"\npeak above weights+grads: plain {plain / 2**20:.0f} MiB, offload {off / 2**20:.0f} "
        f"MiB (layer inputs {layers} x {per_layer / 2**20:.0f} MiB); fwd+bwd {t_plain * 1e3:.1f}"
        f" ms plain, {t_off * 1e3:.1f} ms offload ({100 * (t_off / t_plain - 1):+.1f}%)"
    )
    assert plain - off >= (layers - 2) * per_layer
