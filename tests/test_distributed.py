"""torchrun + FSDP2 on the CPU (gloo): 2 ranks train exactly like 1 with the same global batch.

The runs are compared in float64 (`--dtype fp64`), to its rounding noise: see trainutil. The
2-rank run also scores an lm-eval task on rank 0 (which must not change its training) and its
checkpoint is exported (which must give its final/ weights).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftune.cli import main
from sftune.train.metrics import read_metrics
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


def test_two_ranks_match_one_and_resume_on_one(workdir, gsm8k_jsonl, short_tasks, tmp_path):
    one = _run(workdir, tmp_path / "one", 1, "--max-steps", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    tasks = ["--eval-tasks", "gsm8k_short", "--task-data", f"gsm8k_short={gsm8k_jsonl}"]
    tasks += ["--task-dir", str(short_tasks), "--eval-tasks-every", "2", "--eval-limit", "2"]
    two = _run(workdir, tmp_path / "two", 2, "--max-steps", "4", "--save-every", "2", *tasks)
    assert two.returncode == 0, two.stderr[-3000:]
    key = "task/gsm8k_short/exact_match/strict-match"
    assert [r["step"] for r in read_metrics(tmp_path / "two") if key in r] == [0, 2, 4]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    assert_same_losses(l1, l2)
    w1 = weights(tmp_path / "one")
    assert_same_fp64_weights(w1, weights(tmp_path / "two"))
    # `sftune export` of the 2-rank checkpoint at the last step is the run's final/, exactly.
    exported = tmp_path / "exported"
    assert (
        main(["export", str(tmp_path / "two/checkpoints/step_00000004"), "--out", str(exported)])
        == 0
    )
    final = weights(tmp_path / "two")
    assert load_file(exported / "model.safetensors").keys() == final.keys()
    for k, v in load_file(exported / "model.safetensors").items():
        assert torch.equal(v, final[k]), k

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
