"""One epoch of batches over a packed dataset: each item exactly once, stacked to tensors.

This is the course's API, for a training loop you write yourself: one call, one epoch, no
state to save. `sftune train` does not use it; it draws batches from `sampler.StepSampler`,
which shards each optimizer step's batch across ranks and resumes exactly from a checkpoint.

>>> batches = iterate_batches(dataset, batch_size=8, shuffle=True, seed=epoch)  # doctest: +SKIP
>>> len(batches)  # ceil(len(dataset) / 8); the last batch may be smaller  # doctest: +SKIP
10
>>> next(iter(batches))["input_ids"].shape  # doctest: +SKIP
torch.Size([8, 32])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of items (dicts of equal-shape tensors) into one batch dict.

    >>> collate([{"input_ids": torch.tensor([1, 2])}, {"input_ids": torch.tensor([3, 4])}])
    {'input_ids': tensor([[1, 2],
            [3, 4]])}
    """
    if not items:
        raise ValueError("collate needs at least one item")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


class EpochBatches:
    """The batches of one epoch; `len()` is the number of batches, iteration yields dicts.

    Datasets with a `get_batch(indices)` method (PackedSFTDataset) are gathered in one numpy
    step per batch; any other map-style dataset goes through `collate`.
    """

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def order(self) -> np.ndarray:
        """The item indices of the epoch, in the order they are served."""
        n = len(self.dataset)
        return np.random.default_rng(self.seed).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order()
        get_batch = getattr(self.dataset, "get_batch", None)
        for lo in range(0, len(order), self.batch_size):
            indices = order[lo : lo + self.batch_size]
            if get_batch is not None:
                yield get_batch(indices)
            else:
                yield collate([self.dataset[int(i)] for i in indices])


def iterate_batches(dataset: Any, batch_size: int, shuffle: bool, *, seed: int = 0) -> EpochBatches:
    """One epoch over `dataset` in batches of `batch_size` (the last may be smaller).

    With `shuffle=True` the item order is a permutation drawn from `seed`; pass a different
    seed each epoch (e.g. `seed=base_seed + epoch`) for a new order.
    """
    return EpochBatches(dataset, batch_size, shuffle, seed)
