"""Helpers shared by the trainer tests: read what a run wrote."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sftune.train.logging import read_metrics


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(run) if "train_loss" in r}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")
