"""--activation-offload on: each decoder layer is checkpointed and its input hidden states wait
in host memory (transforms/offload.py). On the CPU the copy is within host memory, through the same
hooks as on a GPU; in float64 nothing changes a number: the same loss and gradients as plain
checkpointing and as none, full fine-tune and LoRA, the same run end to end, exact resume, and
2 ranks equal 1. The GPU side (pinned memory, streams, FSDP2, compile, peak memory) is in
tests/test_gpu_offload.py.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import weakref

import pytest
import torch

from sftune import config as config_mod
from sftune.cli import main
from sftune.train.distributed import decoder_layers
from sftune.train.module import set_checkpointing
from sftune.transforms import lora, offload
from tiny import build_tiny_model
from trainutil import (
    FP64,
    assert_same_fp64_weights,
    assert_same_losses,
    losses,
    train_args,
    weights,
)

VOCAB, LAYERS, HIDDEN, BATCH, SEQ = 260, 3, 64, 2, 24


def _model(how: str, adapters: bool) -> torch.nn.Module:
    model = build_tiny_model(VOCAB, layers=LAYERS, hidden=HIDDEN, dtype=torch.float64)
    if adapters:
        cfg = config_mod.from_flat(dict(lora=True, lora_r=4, lora_targets="all-linear"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the adapters' initial A matrices
            lora.apply_lora(model, cfg)
    if how == "checkpointing":
        set_checkpointing(model, True)
    elif how == "offload":
        offload.apply(model, True)
    model.train()
    return model


def _loss_and_grads(model, steps: int = 2):
    """Two forward+backward passes (the second reuses what the first left behind)."""
    out = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        model.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)  # LoRA's dropout: the same masks (the recompute replays them)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((loss.detach(), grads))
    return out


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_same_loss_and_gradients_as_plain_checkpointing_and_none(adapters):
    runs = {how: _loss_and_grads(_model(how, adapters)) for how in ("none", "checkpointing")}
    model = _model("offload", adapters)
    runs["offload"] = _loss_and_grads(model)
    for how in ("checkpointing", "offload"):
        for (loss, grads), (ref_loss, ref_grads) in zip(runs[how], runs["none"], strict=True):
            assert torch.equal(loss, ref_loss), how
            assert grads.keys() == ref_grads.keys() and grads, how
            for name, grad in grads.items():  # the same ops on the same values: bit-identical
                assert torch.equal(grad, ref_grads[name]), (how, name)
    # The offload path ran: one layer input (B x S x hidden fp64) out and back per layer and
    # pass, each but the lowest layer's prefetching the one below.
    moved = offload.offloader(model)
    assert moved.packed == moved.unpacked == 2 * LAYERS
    assert moved.packed_bytes == 2 * LAYERS * BATCH * SEQ * HIDDEN * 8
    assert moved.prefetched == 2 * (LAYERS - 1)  # and what it fetched was the layer input:
    assert moved.prefetched_bytes == 2 * (LAYERS - 1) * BATCH * SEQ * HIDDEN * 8
    small = torch.zeros(3)  # (torch < 2.13's checkpoint saves an empty placeholder too)
    assert moved._pack(small) is small and moved._unpack(small) is small


@pytest.mark.parametrize("keep", [0, 1, LAYERS], ids=["keep0", "keep1", "keepall"])
def test_keeping_the_last_layers_changes_no_number_and_offloads_the_others(keep):
    """--activation-offload-keep N: the same loss and gradients as plain checkpointing, bit for
    bit; exactly the inputs of the first L - N layers went to the host (and came back), the
    last N stayed (alive after forward, as plain checkpointing keeps them), and every
    offloaded input was prefetched (the top one by the kept layers' backward)."""
    reference = _loss_and_grads(_model("checkpointing", adapters=False))
    model = _model("none", adapters=False)
    note = offload.apply(model, True, keep=keep)
    assert offload.enabled(model) and offload.kept(model) == keep
    offloaded = LAYERS - keep
    assert f"{offloaded * HIDDEN * 8 / 1024:,.1f} KiB of host memory per token" in note
    for (loss, grads), (ref_loss, ref_grads) in zip(_loss_and_grads(model), reference, strict=True):
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and grads
        for name, grad in grads.items():
            assert torch.equal(grad, ref_grads[name]), name
    moved = offload.offloader(model)
    assert moved.packed == moved.unpacked == 2 * offloaded
    assert moved.packed_bytes == 2 * offloaded * BATCH * SEQ * HIDDEN * 8
    assert moved.kept == 2 * keep
    prefetched = offloaded if keep else offloaded - 1
    assert moved.prefetched == 2 * prefetched
    inputs: list[weakref.ref] = []
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append(
                weakref.ref(args[0] if args else kwargs["hidden_states"])
            ),
            with_kwargs=True,
        )
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert [r() is not None for r in inputs] == [False] * offloaded + [True] * keep
    loss.backward()
    offload.apply(model, True)  # back to offloading all of them, on the same offloader
    assert offload.kept(model) == 0 and offload.offloader(model) is moved
    with pytest.raises(config_mod.ConfigError, match="only 3 decoder layers"):
        offload.apply(model, True, keep=LAYERS + 1)


def test_host_memory_arithmetic():
    """The reserve is 10% + 8 GiB (at most half of what is available); the error names the
    need, what is available and the smallest keep that fits; made-up numbers."""
    gib = 2**30
    assert offload.host_room(100 * gib) == 82 * gib
    assert offload.host_room(4 * gib) == 2 * gib
    # Llama 3 8B at 512K: 32 layers x 4 GiB (bf16, hidden 4,096) against 128 GiB available.
    per_layer = 524288 * 4096 * 2
    assert per_layer == 4 * gib
    assert offload.smallest_keep(32, per_layer, offload.host_room(128 * gib)) == 6  # 26 fit
    with pytest.raises(offload.SftuneError) as e:
        offload.check_host_memory(32, 0, per_layer, 128 * gib)
    msg = str(e.value)
    assert "\n" not in msg and "need 128.0 GiB" in msg and "only 128.0 GiB is available" in msg
    assert "use --activation-offload-keep 6 " in msg
    note = offload.check_host_memory(32, 6, per_layer, 128 * gib)
    assert "26 offloaded layer(s) need 104.0 GiB" in note and "128.0 GiB available" in note
    # Two ranks on the host pin twice as much; one layer alone too much: no keep helps.
    with pytest.raises(offload.SftuneError, match="keep 19 "):
        offload.check_host_memory(32, 6, per_layer, 128 * gib, ranks=2)
    with pytest.raises(offload.SftuneError, match="use --activation-offload off"):
        offload.check_host_memory(32, 0, 200 * gib, 128 * gib)


def test_offload_with_tiled_mlp_changes_no_number():
    """--tiled-mlp inside an offloaded layer: its tiles (a sum of weight gradients in another
    order: fp64 rounding) against the plain untiled model, and still only the layer inputs
    move (the MLP input that tiling keeps is saved inside the checkpoint)."""
    from sftune.transforms import tiling

    reference = _loss_and_grads(_model("none", adapters=False))
    model = _model("offload", adapters=False)
    tiling.apply(model, SEQ // 3)
    assert tiling.enabled(model)
    for (loss, grads), (ref_loss, ref_grads) in zip(_loss_and_grads(model), reference, strict=True):
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-12, msg=name)
    assert offload.offloader(model).packed == 2 * LAYERS


@pytest.mark.parametrize("how", ["checkpointing", "offload"])
def test_the_layer_inputs_are_what_the_checkpoint_holds_and_what_moves(how):
    """After forward, plain checkpointing keeps every layer's input tensor alive (its
    `_CheckpointFrame.save_inputs`); with offload nothing refers to them any more: their
    memory is free (on a GPU, the device memory), and only the host copies remain."""
    model = _model(how, adapters=False)
    inputs: list[weakref.ref] = []

    def keep(_module, args, kwargs):
        inputs.append(weakref.ref(args[0] if args else kwargs["hidden_states"]))

    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(keep, with_kwargs=True)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    alive = [r() is not None for r in inputs]
    assert alive == [how == "checkpointing"] * LAYERS
    loss.backward()


def test_apply_off_gives_back_what_the_layers_had():
    model = _model("none", adapters=False)
    auto = config_mod.from_flat(dict(activation_offload="auto"))
    assert "auto: off" in offload.configure(auto, model, compiled=False)  # the planner's call
    assert offload.configure(config_mod.from_flat({}), model, compiled=False) is None
    ignored = config_mod.from_flat(dict(activation_offload_keep=2))
    assert "keep 2 ignored: activation offload is off" in offload.configure(ignored, model, False)
    assert not offload.enabled(model)
    note = offload.apply(model, True)
    assert offload.enabled(model) and "3 decoder layers" in note and "host memory" in note
    assert offload.apply(model, True) and offload.enabled(model)  # twice: still one offloader
    offload.apply(model, False)
    assert not offload.enabled(model)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    set_checkpointing(model, True)  # plain checkpointing under offload, then back to it
    plain = decoder_layers(model)[0]._gradient_checkpointing_func
    offload.apply(model, True)
    offload.apply(model, False)
    layer = decoder_layers(model)[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func is plain


def test_compiled_layers_run_the_offload_and_match(monkeypatch):
    """Layers compiled as module.build_module does (`layer.compile()`): Dynamo breaks its graph
    at the offloader, which runs the layer's forward compiled (here with the aot_eager backend,
    no C++ compiler needed), in forward and in the recompute: the same numbers as eager."""
    compiled = functools.cache(lambda fn, mode: torch.compile(fn, backend="aot_eager"))
    monkeypatch.setattr(offload, "_compiled", compiled)
    torch._dynamo.reset()
    reference = _loss_and_grads(_model("none", adapters=False))
    model = _model("none", adapters=False)
    offload.apply(model, True, compile_layers=True)
    for layer in decoder_layers(model):
        layer.compile(backend="aot_eager")
    try:
        runs = _loss_and_grads(model)
    finally:
        torch._dynamo.reset()
    for (loss, grads), (ref_loss, ref_grads) in zip(runs, reference, strict=True):
        assert torch.equal(loss, ref_loss)
        for name, grad in grads.items():
            assert torch.equal(grad, ref_grads[name]), name
    assert offload.offloader(model).packed == 2 * LAYERS
    assert compiled.cache_info().currsize == 1  # one compiled forward for all the layers


# ----------------------------------------------------------------------------- end to end


def _args(workdir, out, *extra: str) -> list[str]:
    return train_args(workdir, out, "--micro-batch-size", "4", *FP64, *extra)


def test_train_with_offload_is_the_plain_run_and_resumes_exactly(workdir, tmp_path, capsys):
    """`sftune train --activation-offload on` trains exactly like a run without it, says so in
    its notes, and its step-2 checkpoint resumes to the same final weights, with offload or
    (a layout setting, like checkpointing) without."""
    ref, off = tmp_path / "ref", tmp_path / "off"
    assert main(_args(workdir, ref, "--max-steps", "4")) == 0
    capsys.readouterr()
    on = ("--activation-offload", "on")
    assert main(_args(workdir, off, "--max-steps", "4", "--save-every", "2", *on)) == 0
    assert "activation offload: 2 decoder layers checkpointed" in "".join(capsys.readouterr())
    assert sorted(losses(off)) == [1, 2, 3, 4]
    assert losses(off) == losses(ref)
    final = weights(off)
    for name, w in weights(ref).items():
        assert torch.equal(final[name], w), name
    saved = config_mod.load(off / "config.yaml")
    assert saved.model.activation_offload == "on" and saved.model.activation_checkpointing
    for name, extra in (("again", on), ("plain", ("--activation-offload", "off"))):
        out = tmp_path / name
        step2 = off / "checkpoints" / "step_00000002"
        args = _args(workdir, out, "--max-steps", "4", "--resume", str(step2), *extra)
        assert main(args) == 0, name
        assert sorted(losses(out)) == [3, 4]
        assert_same_losses(losses(ref), losses(out))
        for k, w in weights(out).items():
            assert torch.equal(w, final[k]), (name, k)


def test_too_little_host_memory_is_one_line_before_any_step(workdir, tmp_path, capsys, monkeypatch):
    """With offload on and (made-up) 192 KiB of host memory available, the build stops with one
    line naming the need, what is available and the keep that fits, before any step and
    without writing the run directory; with that keep it trains (the numbers: the tests above)."""
    monkeypatch.setattr(offload, "host_available", lambda: 192 * 1024)
    out = tmp_path / "off"
    args = _args(workdir, out, "--max-steps", "1", "--activation-offload", "on")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # 2 layers x micro-batch 4 x 32 tokens x hidden 64 x 8 bytes (64 KiB each) against half
    # of 192 KiB (the reserve's cap on a small host): one layer's inputs fit.
    assert len(err) == 1 and err[0].startswith("sftune: error: --activation-offload: the inputs")
    assert "need 128.0 KiB of host memory (2 x micro-batch 4 x 32 tokens x 64 x 8" in err[0]
    assert "only 192.0 KiB is available (96.0 KiB after" in err[0]
    assert "use --activation-offload-keep 1 " in err[0]
    assert not out.exists()
    assert main([*args, "--activation-offload-keep", "1"]) == 0  # what the error said to use
    printed = "".join(capsys.readouterr())
    assert "the first 1 in host memory" in printed and "the last 1 kept on the device" in printed
    assert "1 offloaded layer(s) need 64.0 KiB of host memory" in printed
    assert sorted(losses(out)) == [1]


@pytest.mark.slow
def test_two_ranks_with_offload_match_one_process(workdir, tmp_path):
    """torchrun on the CPU (gloo): 2 ranks under DDP and under FSDP2, offload on, train like one
    process without it (fp64)."""
    base = ("--max-steps", "3", "--micro-batch-size", "2", *FP64)
    env = {"OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {
        "one": [sys.executable],
        "ddp": [*torchrun, "--nproc-per-node=2"],
        "fsdp": [*torchrun, "--nproc-per-node=2"],
    }
    extra = {
        "one": (),
        "ddp": ("--activation-offload", "on", "--dist", "ddp"),
        "fsdp": ("--activation-offload", "on", "--dist", "fsdp", "--reshard-after-forward", "on"),
    }
    procs = {
        name: subprocess.Popen(
            [*launcher, "-m", "sftune", *train_args(workdir, tmp_path / name, *base, *extra[name])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )
        for name, launcher in runs.items()
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, (name, err.decode()[-3000:])
        if name != "one":
            assert "activation offload: 2 decoder layers" in err.decode() + out.decode()
    for name in ("ddp", "fsdp"):
        assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / name))
        assert_same_fp64_weights(weights(tmp_path / "one"), weights(tmp_path / name))
