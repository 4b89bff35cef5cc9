"""Tiled MLP (sftune.transforms.tiling) on the tiny Llama in float64: the same loss and gradients as
the plain MLP (full fine-tune and LoRA, with and without activation checkpointing, a tile that
does not divide the tokens, packed documents), under torch.compile, and no (tokens x
intermediate) tensor saved for backward."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sftune.cli import main
from sftune.errors import ConfigError, SftuneError
from sftune.train.loop import train
from sftune.train.module import set_checkpointing
from sftune.transforms import tiling
from tiny import build_tiny_model
from trainutil import (
    FP64,
    assert_same_fp64_weights,
    assert_same_losses,
    losses,
    tiny_config,
    train_args,
    weights,
)

VOCAB, HIDDEN, INTER = 97, 64, 192  # INTER: no other activation of the model is 192 wide
B, T = 2, 24  # 48 tokens: tiles of 7 leave a last tile of 6


def _model(lora: bool = False, dropout: float = 0.0):
    model = build_tiny_model(VOCAB, hidden=HIDDEN, intermediate=INTER, dtype=torch.float64)
    if lora:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
        get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)  # in place
        # peft starts B at zero; nonzero adapters make their gradients (and x's) non-trivial.
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    model.train()
    return model


def _batch(packed: bool = False):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[:, :5] = -100
    pos = None
    if packed:  # three documents per row: positions restart at 0 where each one starts
        pos = torch.arange(T).repeat(B, 1)
        pos[:, 9:] -= 9
        pos[:, 17:] -= 8
    return ids, labels, pos


def _loss_and_grads(model, packed: bool = False):
    ids, labels, pos = _batch(packed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=0, atol=1e-12, msg=k)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("chunk,packed", [(7, False), (16, True)], ids=["ragged", "packed"])
def test_same_loss_and_gradients_as_the_plain_mlp(lora, checkpointing, chunk, packed):
    if lora:
        pytest.importorskip("peft")
    plain = _model(lora)
    tiled = copy.deepcopy(plain)
    for m in (plain, tiled):
        set_checkpointing(m, checkpointing)
    note = tiling.apply(tiled, chunk)
    assert f"{chunk:,} tokens per tile" in note and tiling.enabled(tiled)
    expected = _loss_and_grads(plain, packed)
    got = _loss_and_grads(tiled, packed)
    _assert_same(expected, got)
    if lora:  # only the adapters were trained: the frozen base got no gradient
        assert all("lora_" in k for k in got[1])
        assert all(p.grad is None for p in tiled.parameters() if not p.requires_grad)


def test_lora_dropout_is_replayed_in_backward():
    """With dropout on the adapters' input, backward's recompute draws the forward's masks: the
    gradients equal those of the same tiles run through ordinary autograd from the same seed,
    and backward leaves the caller's random state where it found it."""
    pytest.importorskip("peft")
    tiled = _model(lora=True, dropout=0.3)
    by_hand = copy.deepcopy(tiled)
    tiling.apply(tiled, 7)
    for layer in by_hand.model.layers:  # tile by hand, autograd saves every tile's activations
        mlp, plain = layer.mlp, type(layer.mlp).forward
        layer.mlp.forward = lambda x, mlp=mlp, plain=plain: torch.cat(
            [plain(mlp, t) for t in x.reshape(-1, HIDDEN).split(7)]
        ).view_as(x)
    torch.manual_seed(3)
    expected = _loss_and_grads(by_hand)
    after_by_hand = torch.get_rng_state()
    torch.manual_seed(3)
    got = _loss_and_grads(tiled)
    _assert_same(expected, got)
    assert torch.equal(torch.get_rng_state(), after_by_hand)


def test_nothing_tokens_by_intermediate_is_saved_or_made():
    """Tiled, the forward saves no (tokens, intermediate) tensor for backward, and no such
    tensor is ever made (forward, backward, the checkpointed layer's recompute): the widest
    intermediate holds one tile's rows."""
    ids, labels, _ = _batch()
    for checkpointing in (False, True):
        saved, made = {}, {}
        for chunk in (0, 8):
            model = _model()
            set_checkpointing(model, checkpointing)
            tiling.apply(model, chunk)
            rows = []

            def pack(t, rows=rows):
                rows.append(_rows(t))
                return t

            with _RowsMade() as mode:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
                loss.backward()
            saved[chunk], made[chunk] = max(rows, default=0), mode.widest
        # Untiled (the test sees them): B*T rows, saved by forward without checkpointing.
        assert saved == {0: 0 if checkpointing else B * T, 8: 0}
        assert made == {0: B * T, 8: 8}


def _rows(t) -> int:
    """The tokens of an INTER-wide activation; 0 for anything else (down_proj's weight and its
    gradient are INTER wide too, with a weight's shape)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != INTER:
        return 0
    return 0 if tuple(t.shape) == (HIDDEN, INTER) else t.shape[:-1].numel()


class _RowsMade(TorchDispatchMode):
    """The most tokens of any INTER-wide activation that an op returns."""

    widest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            self.widest = max(self.widest, _rows(t))
        return out


def test_no_grad_and_undo():
    """Evaluation (no_grad) is tiled too, with the same output; apply(0) restores the plain
    MLP, and the state dict's keys never change."""
    plain = _model()
    tiled = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    tiling.apply(tiled, 5)
    tiling.apply(tiled, 7)  # again: re-tiled, not wrapped twice
    assert list(tiled.state_dict()) == keys
    ids, _, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(tiled(ids).logits, plain(ids).logits, rtol=0, atol=1e-12)
    assert tiling.apply(tiled, 0) == "tiled MLP off"
    assert not tiling.enabled(tiled)
    assert all("forward" not in vars(layer.mlp) for layer in tiled.model.layers)


def test_bf16_autocast_backward_recomputes_under_autocast():
    """Under bf16 autocast (--dtype bf16-mixed: fp32 weights), backward's recompute runs in
    bf16 as the forward did, the gradients keep the weights' dtype, and they agree with the
    plain MLP's to bf16 rounding."""
    plain = build_tiny_model(VOCAB, hidden=HIDDEN, intermediate=INTER)
    tiled = copy.deepcopy(plain)
    tiling.apply(tiled, 7)
    seen = []
    tiled.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, args, out: seen.append((torch.is_grad_enabled(), args[0].dtype))
    )
    results = []
    for model in (plain, tiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model))
    # 7 tiles in forward (no grad), 7 recomputed with grad: all in bf16.
    assert seen == [(False, torch.bfloat16)] * 7 + [(True, torch.bfloat16)] * 7
    (loss_p, grads_p), (loss_t, grads_t) = results
    assert all(g.dtype == torch.float32 for g in grads_t.values())
    torch.testing.assert_close(loss_t, loss_p, rtol=2e-3, atol=0)
    for k in grads_p:  # bf16 products, summed per tile instead of in one GEMM
        torch.testing.assert_close(grads_t[k], grads_p[k], rtol=5e-2, atol=2e-3, msg=k)


@pytest.mark.slow  # inductor compiles two layers: 20 s on a busy 2-core machine
def test_compiled_layers_run_the_tiled_mlp_eagerly():
    """Each decoder layer torch.compile'd as build_module does (inductor): the tiled MLP is
    left out of the graph (a graph break around it, the rest of the layer compiled) and the
    loss and gradients are those of the same layers compiled untiled. (Compiled and eager
    differ by 1e-8 either way: LlamaRMSNorm computes in fp32, and inductor fuses it.)"""
    from torch._dynamo.utils import counters

    results = []
    for chunk in (0, 7):
        model = _model()
        tiling.apply(model, chunk)
        torch._dynamo.reset()
        counters.clear()
        for layer in model.model.layers:
            layer.compile()
        results.append(_loss_and_grads(model))
        breaks = " ".join(counters["graph_break"])
        assert ("_tiled_forward" in breaks) == bool(chunk)
        assert counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
    _assert_same(*results)


def test_default_chunk():
    assert tiling.default_chunk(4096, 14336, 131072) == 4096  # the 8B: 32 tiles
    assert tiling.default_chunk(4096, 14336, 10000) == 3334  # 3 even tiles, not 4096+4096+1808
    assert tiling.default_chunk(4096, 14336, 512) == 4096  # 8 whole sequences a tile
    assert tiling.default_chunk(64, 128, 32) == 2048  # at least 2,048 tokens
    assert tiling.default_chunk(8192, 2**20, 65536) == 256  # intermediate <= 2**28 elements


def test_config_on_auto_off(workdir, tmp_path):
    model = _model()
    cfg = tiny_config(workdir, tmp_path, tiled_mlp="auto")
    assert tiling.configure(cfg, model) == "tiled MLP auto: off (not chosen by the memory planner)"
    assert not tiling.enabled(model)
    assert tiling.configure(tiny_config(workdir, tmp_path), model) is None
    note = tiling.configure(tiny_config(workdir, tmp_path, tiled_mlp="on"), model)
    assert note.startswith("tiled MLP: 2,048 tokens per tile") and tiling.enabled(model)
    assert tiling.tile_tokens(model) == 2048
    with pytest.raises(ConfigError, match="--tiled-mlp-chunk must be >= 0"):
        tiny_config(workdir, tmp_path, tiled_mlp_chunk=-1)


def test_cli_train_with_tiled_mlp_trains_like_without(workdir, tmp_path, capsys):
    """`sftune train --tiled-mlp on` (tiles of 40 tokens over micro-batches of 4 x 32) ends
    with the losses and weights of the same run untiled, and says so in its build notes."""
    plain = tmp_path / "plain"
    train(tiny_config(workdir, plain, max_steps=2, micro_batch_size=4))
    tiled = tmp_path / "tiled"
    args = train_args(workdir, tiled, *FP64, "--max-steps", "2", "--micro-batch-size", "4")
    assert main([*args, "--seed", "1", "--tiled-mlp", "on", "--tiled-mlp-chunk", "40"]) == 0
    out = capsys.readouterr()
    assert "tiled MLP: 40 tokens per tile" in out.out + out.err
    assert sorted(losses(tiled)) == [1, 2]
    assert_same_losses(losses(plain), losses(tiled))
    assert_same_fp64_weights(weights(plain), weights(tiled))


@pytest.mark.slow
def test_two_ranks_tiled_train_like_one_process_untiled(workdir, tmp_path):
    """DDP and FSDP2 (resharding after forward, layers checkpointed; a full fine-tune and LoRA)
    over 2 gloo ranks, tiled: the losses and weights of one process untiled. Under DDP each
    weight's gradient must reach the reducer once per backward, not once per tile; under FSDP2
    the tiles must differentiate the gathered parameters that its reduce-scatter reads."""
    common = ("--max-steps", "2", "--micro-batch-size", "2", *FP64)
    tiled = ("--tiled-mlp", "on", "--tiled-mlp-chunk", "24")  # 2 x 32 tokens: a ragged tile
    fsdp = ("--dist", "fsdp", "--reshard-after-forward", "on", "--activation-checkpointing")
    lora = ("--lora", "--lora-r", "4")
    runs = {
        "one": (),
        "ddp": ("--dist", "ddp", *tiled),
        "fsdp": (*fsdp, *tiled),
        "one-lora": lora,
        "fsdp-lora": (*fsdp, *lora, *tiled),
    }
    procs = []
    for name, extra in runs.items():
        launcher = [sys.executable]
        if name.startswith(("ddp", "fsdp")):
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        args = train_args(workdir, tmp_path / name, *common, *extra)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [*launcher, "-m", "sftune", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env))
    one = [procs[0], procs[3]]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-3000:]
        assert ("tiled MLP: 24 tokens per tile" in (out + err).decode()) == (p not in one)
    for name, reference in (("ddp", "one"), ("fsdp", "one"), ("fsdp-lora", "one-lora")):
        assert sorted(losses(tmp_path / name)) == [1, 2]
        assert_same_losses(losses(tmp_path / reference), losses(tmp_path / name))
        assert_same_fp64_weights(weights(tmp_path / reference), weights(tmp_path / name))


def test_an_mlp_that_returns_more_than_a_tensor_is_a_one_line_error():
    """A mixture of experts' block returning (hidden, router logits) is not tiled silently."""
    model = _model()
    tiling.apply(model, 7)
    for layer in model.model.layers:
        mlp = layer.mlp
        plain = type(mlp).forward
        mlp.forward = functools.partial(
            tiling._tiled_forward, mlp, lambda self, x, plain=plain: (plain(self, x), None)
        )
    ids, labels, _ = _batch()
    with pytest.raises(SftuneError, match="--tiled-mlp: this model's MLP returns tuple"):
        model(input_ids=ids, labels=labels)


def test_parameters_swapped_before_backward_are_an_error_not_zero_gradients():
    model = _model()
    tiling.apply(model, 7)
    ids, labels, _ = _batch()
    loss = model(input_ids=ids, labels=labels).loss
    mlp = model.model.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach().clone())
    with pytest.raises(SftuneError, match="parameters changed between forward and backward"):
        loss.backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_the_tiles_run_twice_per_step_also_in_a_checkpointed_layer(checkpointing):
    """Forward once, backward's recompute once: a checkpointed layer's own recompute stops
    before the tiles (what the MLP's input is saved for, first), not a third pass."""
    model = _model()
    set_checkpointing(model, checkpointing)
    tiling.apply(model, 7)
    calls = []
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda m, a, y: calls.append(a[0].shape[0]))
    _loss_and_grads(model)
    tiles = [7] * 6 + [6]  # 48 tokens
    assert sorted(calls) == sorted(tiles * 2 * len(model.model.layers))  # 2 passes per layer
