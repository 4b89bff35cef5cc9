"""--fp8 on the CPU: the errors, which linears convert, and that nothing FP8 reaches what is saved.

FP8 GEMMs need a GPU; torchao's emulation (`convert(..., emulate=True)`) runs the same casts
and scales with ordinary matmuls, so the conversion, the FSDP2 FP8 all-gather and the
checkpoints are checked here. tests/test_gpu.py checks the losses on a GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train import checkpoint, distributed
from sftune.train.module import CausalLMWithLoss
from sftune.train.optim import build_optimizer
from sftune.train.step import train_step
from sftune.transforms import fp8
from tiny import build_tiny_model
from trainutil import train_args

pytest.importorskip("torchao")


def _is_fp8(module: nn.Module) -> bool:
    return type(module).__name__ == "Float8Linear"


def test_without_torchao_the_cli_names_the_install(workdir, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    out = tmp_path / "run"
    assert main(train_args(workdir, out, "--fp8", "tensorwise")) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sftune: error: --fp8 needs torchao: pip install 'sftune[fp8]'"
    assert not out.exists()


def test_fp8_on_the_cpu_fails_before_anything_is_written(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(workdir, out, "--fp8", "rowwise", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fp8 needs a CUDA GPU" in err[0] and "on the cpu" in err[0]
    assert not out.exists()


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has 8\.0"):
        fp8.check_available("tensorwise", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    fp8.check_available("rowwise", torch.device("cuda"))  # H100/H200
    fp8.check_available("off", torch.device("cpu"))  # off checks nothing


def test_decoder_linears_convert_except_sizes_fp8_cannot_serve():
    # intermediate 100: gate/up (64 -> 100) and down (100 -> 64) are not multiples of 16.
    model = build_tiny_model(256, hidden=64, intermediate=100)
    note = fp8.convert(model, "tensorwise", all_gather=False, linears="all")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert all(_is_fp8(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        assert not any(_is_fp8(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert type(model.lm_head) is nn.Linear
    assert note == (
        "FP8 (tensorwise, torchao): 8 decoder linears; kept in bf16: the output projection, "
        "6 not sized in multiples of 16"
    )


def test_auto_keeps_the_linears_too_small_to_gain_in_bf16():
    """--fp8-linears auto follows torchao's size thresholds: the Llama 3 8B's
    4096 -> 1024 k/v projections stay bf16 and its other linears convert; a small model keeps
    everything in bf16 and the note says how to convert it anyway."""
    on_meta = lambda i, o: nn.Linear(i, o, bias=False, device="meta")  # noqa: E731
    for recipe in fp8.RECIPES:
        assert fp8.large_enough(on_meta(4096, 4096), recipe)  # q_proj, o_proj
        assert fp8.large_enough(on_meta(4096, 14336), recipe)  # gate/up
        assert fp8.large_enough(on_meta(14336, 4096), recipe)  # down
        assert not fp8.large_enough(on_meta(4096, 1024), recipe)  # k_proj, v_proj
    model = build_tiny_model(256, hidden=64, intermediate=128)
    note = fp8.convert(model, "tensorwise", all_gather=False, linears="auto")
    assert not any(map(_is_fp8, model.modules()))
    assert note == (
        "FP8 (tensorwise, torchao): 0 decoder linears; kept in bf16: the output projection, "
        "14 too small to gain (--fp8-linears all converts them)"
    )


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_converted_model_trains_like_the_plain_one(recipe):
    """Emulated FP8 matmuls: the loss of the plain model to FP8's rounding, gradients for every
    weight, and the same parameters and state dict (names, dtypes, values) as before."""
    plain = build_tiny_model(256, dtype=torch.bfloat16)
    model = build_tiny_model(256, dtype=torch.bfloat16)
    fp8.convert(model, recipe, all_gather=False, linears="all", emulate=True)
    assert sum(map(_is_fp8, model.modules())) == 14
    before, after = plain.state_dict(), model.state_dict()
    assert list(before) == list(after)
    for k, v in after.items():
        assert type(v) is torch.Tensor and v.dtype == before[k].dtype and torch.equal(v, before[k])
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids[:, :-1], labels=ids[:, 1:])
    loss = CausalLMWithLoss(model, fused=True)(**batch, scale=1 / ids[:, 1:].numel())
    loss.backward()
    ref = CausalLMWithLoss(plain, fused=True)(**batch, scale=1 / ids[:, 1:].numel())
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-2)
    assert all(p.grad is not None for p in model.parameters())


def test_save_pretrained_after_conversion_loads_as_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(256, dtype=torch.bfloat16)
    fp8.convert(model, "tensorwise", all_gather=False, linears="all")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not any(map(_is_fp8, loaded.modules()))
    assert not any("float8" in k or "scale" in k for k in loaded.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_fsdp_fp8_all_gather_checkpoints_hold_plain_tensors(tmp_path):
    """Tensorwise under FSDP2 all-gathers FP8 weights held in torchao's wrapper tensors; the
    checkpoint holds plain ones (readable without torchao), and a resume refreshes the
    precomputed FP8 scales. One gloo process."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        world = distributed.World()
        cfg = config_mod.from_flat(dict(device="cpu", lr=1e-2))

        def build(seed: int):
            model = build_tiny_model(256, seed=seed)
            fp8.convert(model, "tensorwise", all_gather=True, linears="all", emulate=True)
            module = CausalLMWithLoss(model, fused=True)
            distributed.apply_fsdp(module, model, cfg.dist, None)
            opt, sched = build_optimizer(
                list(module.parameters()), cfg.optim, 4, torch.device("cpu")
            )
            fp8.precompute_scales_after_steps(opt, module)
            return model, module, opt, sched

        model, module, opt, sched = build(0)
        ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
        train_step(module, opt, sched, [dict(input_ids=ids[:, :-1], labels=ids[:, 1:])])
        weight = model.model.layers[0].mlp.down_proj.weight
        assert type(weight.to_local()).__name__ == "WeightWithDynamicFloat8CastTensor"
        scale = weight._local_tensor._precomputed_scale
        assert scale is not None  # from the optimizer step's hook
        path = checkpoint.save(tmp_path / "run", 1, module, opt, {}, cfg, world, keep=1)

        saved = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()  # forget torchao's classes
        try:
            dcp_to_torch_save(path / "model_optim", tmp_path / "plain.pt")
            state = torch.load(tmp_path / "plain.pt", weights_only=True)
        finally:
            torch.serialization.add_safe_globals(saved)
        assert {type(v) for v in state["model"].values()} == {torch.Tensor}

        model2, module2, opt2, _ = build(1)  # other weights, no scales yet
        weight2 = model2.model.layers[0].mlp.down_proj.weight
        assert weight2._local_tensor._precomputed_scale is None
        checkpoint.load(path, module2, opt2, world)
        assert torch.equal(weight2.full_tensor(), weight.full_tensor())
        assert torch.equal(weight2._local_tensor._precomputed_scale, scale)
    finally:
        dist.destroy_process_group()
