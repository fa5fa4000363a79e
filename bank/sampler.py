"""The epoch sampler: distributed, seeded, block-shuffled, exactly resumable; picks one view per image."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch.utils.data

from bank.spec import BankError, BankSpec


class EpochSampler(torch.utils.data.Sampler[list[int]]):
    """Yields batches (lists of bank views) for one rank: bank rows, or ``2 * row + flip`` for a mirrored bank
    (``spec.mirror``: its flipped views are the stored rows read mirrored; ``BankTrainSet`` reads either).

    Each epoch visits every OK image once across all ranks (ranks disjoint), choosing per image and epoch one of
    the K draws (``draw="random"``; ``"first"`` = draw 0) and one of the flip views (``flip="random"``; ``"none"``
    = the unflipped view). The order is block-shuffled for read locality: shards are permuted, then the images of
    each window of ``window`` consecutive (permuted) shards are permuted together; each rank takes one contiguous
    part of that order, so a batch touches at most a few shard files.

    Resumption: ``state_dict(batches_done=n)`` after ``n`` batches of the epoch were consumed (pass the trainer's
    count: DataLoader workers prefetch, so the sampler runs ahead), then ``load_state_dict`` on a fresh sampler
    continues the epoch with batch ``n`` -- no repeats, no gaps. The order depends on (seed, epoch) only.
    """

    def __init__(
        self,
        spec_or_bank: Any,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        draw: Literal["random", "first"] = "random",
        flip: Literal["random", "none"] = "random",
        shuffle: bool = True,
        drop_last: bool = True,
        window: int = 4,
    ) -> None:
        if isinstance(spec_or_bank, BankSpec):
            self.spec, image_ok = spec_or_bank, np.ones(spec_or_bank.num_images, dtype=bool)
        else:
            self.spec, image_ok = spec_or_bank.spec, spec_or_bank.image_ok
        if draw not in ("random", "first"):
            raise ValueError(f"draw={draw!r}; valid: random, first")
        if flip not in ("random", "none"):
            raise ValueError(f"flip={flip!r}; valid: random, none")
        if not 0 <= rank < world_size or batch_size < 1 or window < 1:
            raise ValueError(
                f"need 0 <= rank < world_size, batch_size >= 1, window >= 1 (got {rank}, {world_size}, "
                f"{batch_size}, {window})"
            )
        self.images = np.flatnonzero(image_ok)
        if len(self.images) < world_size:
            raise BankError(f"{len(self.images)} usable images cannot be split over {world_size} ranks")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.draw, self.flip, self.shuffle, self.drop_last, self.window = (
            draw,
            flip,
            shuffle,
            drop_last,
            window,
        )
        self.epoch, self._skip, self._yielded = 0, 0, 0

    # ---- epoch plan ----------------------------------------------------------------------------------------
    @property
    def images_per_rank(self) -> int:
        n = len(self.images)
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def __len__(self) -> int:
        """Batches per full epoch for this rank."""
        per_rank = self.images_per_rank
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's rows for ``epoch``, in order (before batching).

        The image order and the view choice come from two separate streams of (seed, epoch), so banks that differ
        only in their views (draws, mean rows, mirrored flips) visit the images in the same order: the cache-cost
        study's variants are paired by seed (same student init, same data order)."""
        spec = self.spec
        rng = np.random.default_rng([self.seed, epoch])
        view_rng = np.random.default_rng([self.seed, epoch, 1])
        # 1. per-image view choice (same on every rank: drawn for all images in index order)
        draws = (
            view_rng.integers(spec.draws, size=spec.num_images)
            if self.draw == "random"
            else np.zeros(spec.num_images, int)
        )
        random_flip = self.flip == "random" and spec.read_flips == 2
        flips = view_rng.integers(2, size=spec.num_images) if random_flip else np.zeros(spec.num_images, int)
        # 2. block shuffle: permute shards, then images within windows of consecutive shards
        order = self.images
        if self.shuffle:
            shard = order // spec.images_per_shard
            shard_rank = np.empty(spec.num_shards, dtype=np.int64)
            shard_rank[rng.permutation(spec.num_shards)] = np.arange(spec.num_shards)
            window = shard_rank[shard] // self.window
            order = order[np.lexsort((rng.random(len(order)), window))]
        # 3. equal contiguous parts per rank (drop_last: drop the remainder; else wrap around to pad)
        per_rank = self.images_per_rank
        total = per_rank * self.world_size
        order = np.resize(order, total)
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        if spec.mirror:
            return (mine * spec.draws + draws[mine]) * 2 + flips[mine]
        return (mine * spec.draws + draws[mine]) * spec.flips + flips[mine]

    def __iter__(self):
        rows = self.epoch_rows(self.epoch)
        num_batches = len(self)
        start, self._skip = self._skip, 0
        self._yielded = start
        for b in range(start, num_batches):
            self._yielded = b + 1
            yield rows[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    # ---- state ---------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """``batches_done``: batches of the current epoch the trainer consumed (default: batches yielded)."""
        return {
            "epoch": self.epoch,
            "batches_done": self._yielded if batches_done is None else batches_done,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "num_images": len(self.images),
            "draw": self.draw,
            "flip": self.flip,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        changed = [
            k
            for k in ("seed", "world_size", "batch_size", "num_images", "draw", "flip")
            if state[k] != mine[k]
        ]
        if changed:
            raise ValueError(
                f"cannot resume mid-epoch: {', '.join(f'{k} {state[k]} -> {mine[k]}' for k in changed)} changed; "
                "the epoch order would differ"
            )
        self.epoch, self._skip = int(state["epoch"]), int(state["batches_done"])
