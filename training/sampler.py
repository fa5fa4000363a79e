"""Step-indexed batches: the batch of step ``s`` is a pure function of ``(seed, s)``, so a resume starts at a step.

Used by finetune and teacher training (distill reads the bank through the bank's own ``EpochSampler``, whose
position is an epoch and a batch count). Why not ``DistributedSampler``: it cannot start mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

SEED_STRIDE = 1_000_003
"""Per-sample seeds are ``seed * SEED_STRIDE + position``: distinct for every position of every seed in practice."""


class StepBatchSampler(Sampler[list]):
    """This rank's share of the global batches of steps ``start..total-1``.

    The global order is a concatenation of per-epoch permutations of ``range(size)`` seeded by ``(seed, epoch)``
    (every item once per epoch); step ``s`` takes positions ``s * global_batch ..`` of that order and rank ``r``
    its ``r``-th slice. Each sample also gets a seed, ``seed * SEED_STRIDE + position``, for its augmentation.
    A resumed run (``start`` = the checkpoint's step) thus sees exactly the batches and augmentations of an
    uninterrupted one, on any number of workers.

    Yields ``[(index, sample_seed), ...]`` (datasets that augment per sample) or, with ``with_seeds=False``,
    ``[index, ...]``.
    """

    def __init__(
        self,
        size: int,
        global_batch: int,
        total: int,
        start: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        *,
        with_seeds: bool = True,
        key: str = "batch_size",
        repeats: int = 1,
    ) -> None:
        """``key`` names the batch-size config key for the error message (``finetune.batch_size``).

        ``repeats`` > 1 is repeated augmentation (Hoffer et al. 2020; timm's ``RepeatAugSampler``): an epoch of
        ``size`` positions holds ``size / repeats`` images, each ``repeats`` times in a row (so in one global batch
        but for the batch's last), each copy with its own sample seed, i.e. its own augmentation."""
        if size < 1:
            raise ValueError(f"no training items to sample from (size={size})")
        if global_batch % world:
            raise ValueError(f"{key}={global_batch} is not divisible by the {world} ranks")
        self.size, self.batch, self.total, self.start = size, global_batch, total, start
        self.seed, self.rank, self.world, self.with_seeds = seed, rank, world, with_seeds
        self.repeats = max(1, repeats)
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            if self.repeats > 1:
                order = np.repeat(order, self.repeats)[: self.size]
            self._cached = (epoch, order)
        return self._cached[1]

    def batch_keys(self, step: int) -> list[tuple[int, int]]:
        """``(index, sample_seed)`` of this rank's share of step ``step``."""
        per_rank = self.batch // self.world
        keys = []
        for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            position = step * self.batch + slot
            epoch, offset = divmod(position, self.size)
            keys.append((int(self._epoch_order(epoch)[offset]), self.seed * SEED_STRIDE + position))
        return keys

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.total):
            keys = self.batch_keys(step)
            yield keys if self.with_seeds else [index for index, _ in keys]
