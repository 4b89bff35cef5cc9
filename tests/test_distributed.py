"""torchrun + FSDP2 on the CPU (gloo): 2 ranks train exactly like 1 with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trainutil import losses, train_args, weights

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
        *train_args(workdir, out, "--micro-batch-size", "2", "--fsdp", "on", *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + args, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_match_one_and_resume_on_one(workdir, tmp_path):
    one = _run(workdir, tmp_path / "one", 1, "--max-steps", "4")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(workdir, tmp_path / "two", 2, "--max-steps", "4", "--save-every", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == [1, 2, 3, 4]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)

    # The 2-rank checkpoint at step 2 resumes on 1 rank and ends where both runs ended.
    resume_dir = tmp_path / "two" / "checkpoints" / "step_00000002"
    again = _run(workdir, tmp_path / "again", 1, "--max-steps", "4", "--resume", str(resume_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    l3 = losses(tmp_path / "again")
    assert sorted(l3) == [3, 4]
    for step in l3:
        assert l3[step] == pytest.approx(l1[step], rel=1e-4)
    w3 = weights(tmp_path / "again")
    for k in w1:
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-4, atol=1e-5)
