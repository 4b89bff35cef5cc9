"""Helpers shared by the trainer tests: read what a run wrote."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sftune.train.metrics import read_metrics


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


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
        *extra,
    ]
