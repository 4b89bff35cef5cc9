"""--dist: which engine auto picks, and torchrun on the CPU (gloo) with DDP and FSDP2: 2 ranks
train exactly like 1 process with the same global batch (DDP's 2 ranks on two "nodes" joined by
the c10d rendezvous), and a 2-rank checkpoint resumes in one process under the other engine.

The runs are compared in float64 (`--dtype fp64`), to its rounding noise: see trainutil.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sftune import config as config_mod
from sftune.cli import main
from sftune.errors import ConfigError
from sftune.train import distributed
from sftune.train.distributed import World
from sftune.train.metrics import read_metrics
from tiny import build_tiny_model
from trainutil import (
    FP64,
    assert_same_fp64_weights,
    assert_same_losses,
    losses,
    train_args,
    weights,
)

CUDA = torch.device("cuda", 0)


def _gpu_of(monkeypatch, gib: float) -> None:
    """Pretend that every CUDA device has `gib` GiB (plan only reads the total)."""
    props = SimpleNamespace(total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def _plan(model, world: World, device=CUDA, **dist):
    cfg = config_mod.from_flat(dist).dist
    return distributed.plan(cfg, world, model, device)


def test_auto_replicates_what_fits_and_shards_the_rest(monkeypatch):
    model = build_tiny_model(256)  # fp32: weights + grads + two AdamW moments = 16 B/param
    need = distributed.training_state_bytes(model)
    assert need == 16 * sum(p.numel() for p in model.parameters())
    two = World(0, 2, 0)
    _gpu_of(monkeypatch, need / 0.4 / 2**30 * 1.01)  # just within the share
    p = _plan(model, two)
    assert (p.strategy, p.reshard_after_forward) == ("ddp", False)
    assert "within 40%" in p.why
    assert _plan(model, World()).strategy == "none"  # one process
    # --dist fsdp on a model that fits: FSDP2 without resharding, unless asked.
    assert _plan(model, two, dist="fsdp").reshard_after_forward is False
    assert _plan(model, two, dist="fsdp", reshard_after_forward="on").reshard_after_forward
    assert _plan(model, two, cpu_offload=True).strategy == "fsdp"
    assert _plan(model, two, reduce_fp32=True).strategy == "fsdp"

    _gpu_of(monkeypatch, need / 0.4 / 2**30 * 0.99)  # just over
    p = _plan(model, two)
    assert (p.strategy, p.reshard_after_forward) == ("fsdp", True)
    assert "over 40%" in p.why
    assert _plan(model, two, dist="ddp").strategy == "ddp"  # asked for: done, and said why
    # On the CPU there is no device memory to budget: replicated, deterministically.
    p = _plan(model, two, device=torch.device("cpu"))
    assert (p.strategy, p.reshard_after_forward) == ("ddp", False)
    assert "CPU" in distributed.describe(p, two)


def test_lora_counts_gradients_and_optimizer_state_of_the_adapters_only():
    model = build_tiny_model(256)
    full = distributed.training_state_bytes(model)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0.mlp" in name)  # stand-in for adapters on a frozen base
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert distributed.training_state_bytes(model) == full / 4 + 3 * trainable


def test_dist_flags_and_their_old_name(tmp_path):
    assert config_mod.from_flat({"fsdp": "on"}).dist.dist == "fsdp"
    assert config_mod.from_flat({"fsdp": "off"}).dist.dist == "none"
    f = tmp_path / "run.yaml"
    f.write_text("dist:\n  fsdp: on\n  reshard_after_forward: off\n")  # YAML: booleans
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    dist = config_mod.from_args(parser.parse_args(["--config", str(f)])).dist
    assert (dist.dist, dist.reshard_after_forward) == ("fsdp", "off")
    flags = parser.parse_args(["--config", str(f), "--dist", "ddp"])
    assert config_mod.from_args(flags).dist.dist == "ddp"  # a flag beats the file
    with pytest.raises(ConfigError, match="--fsdp on and --dist ddp disagree"):
        config_mod.from_args(parser.parse_args(["--fsdp", "on", "--dist", "ddp"]))
    with pytest.raises(ConfigError, match="--cpu-offload is an FSDP setting"):
        config_mod.from_flat({"dist": "ddp", "cpu_offload": True})
    with pytest.raises(ConfigError, match="--dist none: 2 ranks would train 2 separate models"):
        config_mod.check_world_size(config_mod.from_flat({"dist": "none"}), 2)


# ----------------------------------------------------------------------------- torchrun, gloo


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(workdir, out, *extra: str, launcher: list[str] | None = None):
    """`sftune train` on the tiny model, fp64, micro-batch 2; one process unless `launcher`."""
    args = train_args(workdir, out, "--micro-batch-size", "2", *FP64, *extra)
    cmd = [*(launcher or [sys.executable]), "-m", "sftune", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


def _ok(*procs: subprocess.Popen) -> str:
    """Waits for the processes; their stderr (for the notes) when all succeeded."""
    err = ""
    for p in procs:
        out, e = p.communicate(timeout=600)
        assert p.returncode == 0, e.decode()[-3000:]
        err += e.decode() + out.decode()
    return err


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory):
    """One process, 4 steps: what every other layout must reproduce."""
    out = tmp_path_factory.mktemp("dist") / "one"
    _ok(_train(workdir, out, "--max-steps", "4"))
    return losses(out), weights(out)


def _resume_matches(workdir, checkpoint, out, reference, *extra: str) -> None:
    """The step-2 checkpoint resumed in one process ends where the reference ended."""
    _ok(_train(workdir, out, "--max-steps", "4", "--resume", str(checkpoint), *extra))
    again = losses(out)
    assert sorted(again) == [3, 4]
    assert_same_losses(reference[0], again)
    assert_same_fp64_weights(reference[1], weights(out))


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_and_resume_in_one_process_under_ddp(
    workdir, tmp_path, reference, gsm8k_jsonl, short_tasks
):
    """FSDP2 over 2 ranks == 1 process, resharding after forward (the path of models too large
    to replicate), with task accuracy on rank 0 at the right steps; `sftune export` of its last
    checkpoint is its final/ exactly, and its step-2 checkpoint resumes in one process under
    DDP (a one-process group: DDP needs one even alone)."""
    two = tmp_path / "two"
    fsdp = ("--dist", "fsdp", "--reshard-after-forward", "on")
    tasks = ["--eval-tasks", "gsm8k_short", "--task-data", f"gsm8k_short={gsm8k_jsonl}"]
    tasks += ["--task-dir", str(short_tasks), "--eval-tasks-every", "2", "--eval-limit", "2"]
    run = _train(
        workdir,
        two,
        "--max-steps",
        "4",
        "--save-every",
        "2",
        *fsdp,
        *tasks,
        launcher=_torchrun(2),
    )
    assert "dist fsdp: FSDP2 over 2 rank(s), resharding after forward" in _ok(run)
    key = "task/gsm8k_short/exact_match/strict-match"
    assert [r["step"] for r in read_metrics(two) if key in r] == [0, 2, 4]
    assert sorted(losses(two)) == [1, 2, 3, 4]
    assert_same_losses(reference[0], losses(two))
    assert_same_fp64_weights(reference[1], weights(two))
    exported = tmp_path / "exported"
    assert main(["export", str(two / "checkpoints/step_00000004"), "--out", str(exported)]) == 0
    final = weights(two)
    assert load_file(exported / "model.safetensors").keys() == final.keys()
    for k, v in load_file(exported / "model.safetensors").items():
        assert torch.equal(v, final[k]), k
    checkpoint = two / "checkpoints" / "step_00000002"
    _resume_matches(workdir, checkpoint, tmp_path / "again", reference, "--dist", "ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_nodes_matches_one_process_and_resumes_in_one_under_fsdp(
    workdir, tmp_path, reference
):
    """README's two-node command as 2 "nodes" x 1 process on this machine: both agents meet
    at the c10d rendezvous (the first to bind the port hosts its store) and pick DDP (auto, on
    the CPU). 2 ranks == 1 process, and the step-2 checkpoint resumes in one process under
    FSDP2."""
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=localhost:{_free_port()}",
        "--rdzv-id=sftune-test",
        "--max-restarts=0",
    ]
    out = tmp_path / "nodes"
    nodes = [
        _train(workdir, out, "--max-steps", "4", "--save-every", "2", launcher=launch)
        for _ in range(2)
    ]
    assert "dist ddp: DDP (replicated) over 2 rank(s)" in _ok(*nodes)
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert_same_losses(reference[0], losses(out))
    assert_same_fp64_weights(reference[1], weights(out))
    checkpoint = out / "checkpoints" / "step_00000002"
    _resume_matches(workdir, checkpoint, tmp_path / "again", reference, "--dist", "fsdp")


@pytest.mark.slow
def test_lora_two_ranks_match_one_under_both_engines(workdir, tmp_path):
    """LoRA adapters on a replicated (DDP, what auto picks) or FSDP2-sharded base: 2 ranks
    train like 1 process (fp64), and the adapter is saved in PEFT's format."""
    lora = ("--lora", "--lora-r", "4", "--max-steps", "3")
    runs = {"one": (), "ddp": ("--dist", "ddp"), "fsdp": ("--dist", "fsdp")}
    _ok(
        *(
            _train(workdir, tmp_path / name, *lora, *dist, launcher=_torchrun(2) if dist else None)
            for name, dist in runs.items()
        )
    )
    for name in ("ddp", "fsdp"):
        assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / name))
        assert_same_fp64_weights(weights(tmp_path / "one"), weights(tmp_path / name))
        assert (tmp_path / name / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer,package", [("adamw8bit", "torchao"), ("adamw8bit-bnb", "bitsandbytes")]
)
def test_8bit_adamw_under_ddp_trains_like_one_process(workdir, tmp_path, optimizer, package):
    """--optimizer adamw8bit / adamw8bit-bnb on 2 DDP ranks: the same 4 steps as one process.
    Both compute each update in fp32 (even for these fp64 weights) and requantize the moments to
    8 bits, so the ranks' fp64 summation-order noise (1e-15) can, rarely, move a value by one
    fp32 or one 8-bit rounding step: the comparison allows that (1e-6 relative), not an exact
    match."""
    pytest.importorskip(package)
    eight = ("--optimizer", optimizer, "--max-steps", "4")
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    err = _ok(
        _train(workdir, one, *eight),
        _train(workdir, ddp, *eight, "--dist", "ddp", launcher=_torchrun(2)),
    )
    assert f"optimizer: AdamW8bit ({package}:" in err
    assert "dist ddp: DDP (replicated) over 2 rank(s)" in err
    expected, got = losses(one), losses(ddp)
    assert sorted(got) == [1, 2, 3, 4] and got[4] < got[1]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    w_one, w_ddp = weights(one), weights(ddp)
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=1e-6, atol=1e-8)
