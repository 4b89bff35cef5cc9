"""torchrun + FSDP2 on the CPU (gloo): 2 ranks train exactly like 1 with the same global batch.

The runs are compared in float64 (`--dtype fp64`), to its rounding noise: see trainutil.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainutil import (
    FP64,
    assert_same_fp64_weights,
    assert_same_losses,
    losses,
    train_args,
    weights,
)

pytestmark = pytest.mark.slow


def _run(workdir, out, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    args = [
        "-m",
        "sftune",
        *train_args(workdir, out, "--micro-batch-size", "2", "--fsdp", "on", *FP64, *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_match_one_and_resume_on_one(workdir, tmp_path):
    one = _run(workdir, tmp_path / "one", 1, "--max-steps", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(workdir, tmp_path / "two", 2, "--max-steps", "4", "--save-every", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert_same_losses(l1, l2)
    w1 = weights(tmp_path / "one")
    assert_same_fp64_weights(w1, weights(tmp_path / "two"))

    # The 2-rank checkpoint at step 2 resumes on 1 rank and ends where both runs ended.
    resume_dir = tmp_path / "two" / "checkpoints" / "step_00000002"
    again = _run(workdir, tmp_path / "again", 1, "--max-steps", "4", "--resume", str(resume_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    l3 = losses(tmp_path / "again")
    assert sorted(l3) == [3, 4]
    assert_same_losses(l1, l3)
    assert_same_fp64_weights(w1, weights(tmp_path / "again"))


def test_lora_two_ranks_match_one(workdir, tmp_path):
    """LoRA adapters on an FSDP2-sharded base: 2 ranks train like 1 (fp64)."""
    lora = ("--lora", "--lora-r", "4", "--max-steps", "3")
    one = _run(workdir, tmp_path / "one", 1, *lora)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(workdir, tmp_path / "two", 2, *lora)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_losses(losses(tmp_path / "one"), losses(tmp_path / "two"))
    assert_same_fp64_weights(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").is_file()
