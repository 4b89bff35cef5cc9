"""--optimizer adamw8bit (torchao's AdamW8bit) and adamw8bit-bnb (bitsandbytes') on the CPU: each
trains, its moments take a quarter of fp32 AdamW's memory, a killed run resumes exactly, and what
it cannot do is refused."""

from __future__ import annotations

from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train import module as module_mod
from sftune.train.build import build_optimization
from sftune.train.distributed import World
from sftune.train.optim import build_optimizer
from tiny import build_tiny_model
from trainutil import losses, train_args, weights

# Each choice with the package it needs (skipped where that is not installed).
EIGHT_BIT = [
    pytest.param("adamw8bit", marks=pytest.mark.skipif(not find_spec("torchao"), reason="torchao")),
    pytest.param(
        "adamw8bit-bnb",
        marks=pytest.mark.skipif(not find_spec("bitsandbytes"), reason="bitsandbytes"),
    ),
]


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """The bytes of both moments (8-bit codes and their scales, or plain tensors)."""
    total = 0
    for state in opt.state.values():
        if "state1" in state:  # bitsandbytes
            parts = [state[k] for k in ("state1", "state2", "absmax1", "absmax2") if k in state]
        else:  # torchao
            parts = []
            for t in (state["exp_avg"], state["exp_avg_sq"]):
                parts += [t.codes, t.scale] if hasattr(t, "codes") else [t]
        total += sum(x.numel() * x.element_size() for x in parts)
    return total


@pytest.mark.parametrize("optimizer", EIGHT_BIT)
def test_8bit_steps_with_a_quarter_of_the_state_and_materializes_without_a_change(optimizer):
    cfg = config_mod.from_flat({"optimizer": optimizer, "lr": 1e-2})
    model = build_tiny_model(256, hidden=64, intermediate=256, seed=0)
    opt, sched = build_optimizer(list(model.parameters()), cfg.optim, 4, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    module_mod.materialize_optimizer_state(opt)  # the probe's state: no weight moves
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    assert _state_bytes(opt) > 0
    ids = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(4):
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        first = first if first is not None else float(loss.detach())
        loss.backward()
        norm = opt.clip_and_step(1.0)
        sched.step()
        opt.zero_grad()
    assert float(norm) > 0 and float(loss) < first
    params = sum(p.numel() for p in model.parameters())
    plain_fp32 = 2 * 4 * params  # torch AdamW's two fp32 moments
    assert _state_bytes(opt) < 0.3 * plain_fp32


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", EIGHT_BIT)
def test_8bit_run_resumes_exactly(workdir, tmp_path, optimizer):
    """A run resumed from the step-2 checkpoint of a 4-step run ends bit-identical to it: the
    8-bit moments and their scales travel through the checkpoint unchanged."""
    args = ("--optimizer", optimizer, "--micro-batch-size", "4", "--max-steps", "4")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(train_args(workdir, ref, *args, "--save-every", "2")) == 0
    step2 = ref / "checkpoints" / "step_00000002"
    assert main(train_args(workdir, cut, *args, "--resume", str(step2))) == 0
    resumed, full = losses(cut), losses(ref)
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in resumed)
    w_ref, w_cut = weights(ref), weights(cut)
    assert all(torch.equal(w_ref[k], w_cut[k]) for k in w_ref)


@pytest.mark.parametrize(
    "optimizer,package,extra",
    [("adamw8bit", "torchao", "adamw8bit"), ("adamw8bit-bnb", "bitsandbytes", "adamw8bit-bnb")],
)
def test_8bit_refusals(workdir, tmp_path, capsys, monkeypatch, optimizer, package, extra):
    with pytest.raises(ConfigError, match="--compile-step compiles torch's AdamW"):
        config_mod.from_flat({"optimizer": optimizer, "compile_step": True})
    cfg = config_mod.from_flat({"optimizer": optimizer})
    with pytest.raises(ConfigError, match=f"--optimizer {optimizer}: not supported with FSDP2"):
        build_optimization(cfg, SimpleNamespace(sharded=True), 8, World(), torch.device("cpu"))
    out = tmp_path / "run"
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == package else find_spec(name)
    )
    assert main(train_args(workdir, out, "--optimizer", optimizer)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sftune: error: --optimizer {optimizer} needs {package}: pip install 'sftune[{extra}]'"
    )
    assert not out.exists()
