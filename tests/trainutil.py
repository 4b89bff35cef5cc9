"""Helpers shared by the trainer tests: read what a run wrote, and compare two runs.

Runs that must train identically (accumulation, 2 ranks vs 1, a checkpoint resumed on another
world size) are compared in float64 (`--dtype fp64`). In fp32, AdamW's division by the square
root of a small second moment turns the 1e-9 rounding differences of two summation orders
(micro-batch shapes, ranks, threads, the CPU's vector width) into 1e-6 differences on some
weights after a few steps, so no fixed fp32 tolerance holds on every CPU. In fp64 the same
noise is ~1e-15, and the tolerance below stays more than a thousand times above it and
thousands of times below what fp32 reaches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftune.train.metrics import read_metrics

FP64 = ("--dtype", "fp64")
# Weights of two fp64 runs after 4 AdamW steps differ by at most 3.6e-15 (measured with 1 and
# 2 threads, and with other CPUs' kernels: ATEN_CPU_CAPABILITY=avx2/default with
# MKL_ENABLE_INSTRUCTIONS=AVX2/SSE4_2), which uses at most 6e-4 of this tolerance; the same
# runs in fp32 differ by up to 2e-6, 6e3 to 4e5 times what it allows.
FP64_RTOL, FP64_ATOL = 1e-10, 5e-12
# metrics.jsonl logs the step loss through fp32 tensors (train_step sums the micro-batch
# shares into an fp32 accumulator, the ranks' shares are summed in fp32), so even fp64 runs
# agree on it only to a few fp32 roundings: about 5 * 2**-24 = 3e-7 relative here at most
# (measured: 1e-7 for 2 ranks vs 1, 0 for accumulation).
LOGGED_LOSS_RTOL = 1e-6


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_losses(expected: dict[int, float], actual: dict[int, float]) -> None:
    """Two runs logged the same train loss at every step that `actual` logged."""
    for step in actual:
        assert actual[step] == pytest.approx(expected[step], rel=LOGGED_LOSS_RTOL), step


def assert_same_fp64_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]):
    """Two fp64 runs ended with the same weights, to fp64 rounding noise."""
    assert actual.keys() == expected.keys()
    for k in expected:
        assert expected[k].dtype == actual[k].dtype == torch.float64, k
        torch.testing.assert_close(actual[k], expected[k], rtol=FP64_RTOL, atol=FP64_ATOL)


def train_args(workdir: Path, out: Path, *extra: str) -> list[str]:
    """`sftune train` arguments for the tiny model and arithmetic file of the `workdir` fixture."""
    return [
        "train",
        "--model",
        str(workdir / "model"),
        "--train-data",
        str(workdir / "train.jsonl"),
        "--seq-length",
        "32",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--num-samples",
        "0",
        "--output-dir",
        str(out),
        # These runs are compared exactly, as CPU runs are: on a GPU machine too (a flag given
        # again in `extra` wins).
        "--device",
        "cpu",
        *extra,
    ]


def tiny_config(workdir: Path, out: Path, **over):
    """The config of a fp64 run of the `workdir` fixture's tiny model and arithmetic file
    (4 steps of 8 x 32 tokens, logged every step, no samples); `over` sets any field."""
    from sftune import config as config_mod

    values = dict(
        model=str(workdir / "model"),
        train_data=str(workdir / "train.jsonl"),
        seq_length=32,
        batch_size=8,
        max_steps=4,
        lr=3e-3,
        log_every=1,
        output_dir=str(out),
        num_samples=0,
        seed=1,
        dtype="fp64",  # runs compared to fp64 rounding noise: see the module doc
        device="cpu",  # exact comparisons, also where a GPU is present
    )
    return config_mod.from_flat({**values, **over})
