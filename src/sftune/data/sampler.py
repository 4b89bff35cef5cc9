"""Which packed sequences each rank trains on at each optimizer step, with exact resume.

This is the trainer's batching API (`sftune train`): it holds a position that goes into
every checkpoint (`state_dict()`) and gives each rank its share of the step's global batch.
For one epoch in a loop of your own, `batches.iterate_batches` is the simpler API.

Every epoch is one seeded permutation of the item indices (the same on every rank). Optimizer
step s of an epoch takes the global batch `perm[s*B:(s+1)*B]`; rank r of W takes the r-th of W
equal contiguous slices of it. So the set of sequences in a step does not depend on the
number of ranks, and a checkpoint written on 2 ranks resumes on 1 at the same place. Items
left over at the end of an epoch (fewer than B) are skipped; the next epoch reshuffles.

    >>> s = StepSampler(10, 4, shuffle=False, seed=0, rank=1, world_size=2)
    >>> s.steps_per_epoch, s.next_indices().tolist(), s.next_indices().tolist()
    (2, [2, 3], [6, 7])
    >>> s.state_dict()["epoch"], s.state_dict()["step_in_epoch"]
    (1, 0)
"""

from __future__ import annotations

import numpy as np


class StepSampler:
    """Rank `rank`'s item indices for each optimizer step (see the module doc); `state_dict()`
    saves the position, `load_state_dict()` resumes it and refuses a different data order."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by world size {world_size}"
            )
        if num_items < global_batch:
            raise ValueError(
                f"the training set has {num_items} sequences, fewer than one batch of {global_batch}"
            )
        self.num_items = num_items
        self.global_batch = global_batch
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._perm = rng.permutation(self.num_items)
            else:
                self._perm = np.arange(self.num_items)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> np.ndarray:
        """This rank's item indices for the next optimizer step; advances the position."""
        start = self.step_in_epoch * self.global_batch
        per_rank = self.global_batch // self.world_size
        lo = start + self.rank * per_rank
        out = self._permutation()[lo : lo + per_rank].copy()
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "num_items": self.num_items,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "global_batch", "shuffle", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint was written with {key}={state[key]}, this run has {getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
