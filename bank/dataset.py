"""Training-side reading: a fork-safe map-style dataset over bank rows, collation, decoding on the GPU.

Build the loader with :func:`make_loader`, or by hand::

    dataset = BankTrainSet(path)
    sampler = EpochSampler(Bank.open(path), batch_size, rank=rank, world_size=world, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_rows, num_workers=8, pin_memory=True)
    for batch in loader:                                   # DataLoader calls dataset.__getitems__(rows)
        targets = decode_targets(batch["targets"], device)  # int8 payload moved, then dequantised on the GPU
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from bank.codecs import CODECS, Codec
from bank.config import ChunkCheck
from bank.layout import split_views
from bank.projection import Projection
from bank.reader import Bank, BankFormatWarning
from bank.sampler import EpochSampler


class BankTrainSet(torch.utils.data.Dataset):
    """Rows of a bank as torch tensors. The bank is opened lazily in each process (safe under fork)."""

    def __init__(
        self,
        path: str | Path,
        levels: list[str] | None = None,
        *,
        verify_chunks: ChunkCheck = "first",
        labels: bool = False,
    ) -> None:
        """``verify_chunks``: when each chunk's crc32c is checked (format v2; see ``Bank.open``): by default the
        first time each worker reads the chunk, so an epoch after the first costs the copy alone.
        ``labels``: batches carry the bank's soft labels too (``dreamteacher interpret``; required complete)."""
        self.path, self.levels, self.verify_chunks = Path(path), levels, verify_chunks
        self.labels = labels
        bank = Bank.open(self.path, verify_chunks=verify_chunks)  # validate now, in the parent, not mid-epoch
        if levels is not None:
            bank.array_defs(levels)
        if labels:
            bank.require_labels()
        self.spec, self.fingerprint = bank.spec, bank.fingerprint
        self._bank: Bank | None = bank
        self._pid = os.getpid()

    @property
    def bank(self) -> Bank:
        if self._bank is None or self._pid != os.getpid():
            with warnings.catch_warnings():  # a v1 bank's notice was given by the parent's open
                warnings.simplefilter("ignore", BankFormatWarning)
                self._bank = Bank.open(self.path, verify_chunks=self.verify_chunks)
            self._pid = os.getpid()
        return self._bank

    def __getstate__(self) -> dict[str, Any]:  # spawn / forkserver workers: reopen on the other side
        return {**self.__dict__, "_bank": None}

    def __len__(self) -> int:
        """Views: the stored rows, twice over for a mirrored bank (its flipped views are read, not stored)."""
        return self.spec.num_rows * (2 if self.spec.mirror else 1)

    def __getitems__(self, views: Sequence[int]) -> dict[str, Any]:
        """A batch: ``image`` uint8 (B, 3, H, W), ``targets`` {level: {part: tensor}}, ``row``/``draw``/... (B,)
        and ``mirror`` (B,) bool: the targets still to mirror after decoding (``decode_targets`` does); with
        ``labels``, ``labels`` {part: tensor}: each view's own soft labels (``bank.decode_labels``).

        A view is a bank row, or for a mirrored bank ``2 * row + flip`` (``EpochSampler`` yields these); its
        ``flip`` is the view's, its ``row`` the stored row."""
        index = np.asarray(views, dtype=np.int64)
        rows, mirror = split_views(self.spec, index)
        batch = self.bank.read_rows(rows, self.levels, mirror=mirror, labels=self.labels)
        if mirror is not None:
            batch["flip"] = mirror.astype(np.int64)
        extra = {}
        if self.labels:
            extra["labels"] = {p: torch.from_numpy(a) for p, a in batch["labels"].items()}
        return {
            **extra,
            "image": torch.from_numpy(batch["image"]),
            "targets": {
                lv: {p: torch.from_numpy(a) for p, a in parts.items()}
                for lv, parts in batch["targets"].items()
            },
            **{k: torch.from_numpy(batch[k]) for k in ("row", "source_index", "draw", "flip", "seed", "ok")},
            "mirror": torch.from_numpy(np.zeros(len(index), bool) if mirror is None else mirror),
        }

    def __getitem__(self, row: int) -> dict[str, Any]:
        batch = self.__getitems__([row])
        return _index_tree(batch, 0)


def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return tree[i]


def collate_rows(batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for a DataLoader over :class:`BankTrainSet`: a batch from ``__getitems__`` passes through; a list
    of single rows (``__getitem__``) is stacked with torch's ``default_collate``."""
    if isinstance(batch, dict):
        return batch
    return torch.utils.data.default_collate(batch)


def _codec_for_parts(parts: dict[str, torch.Tensor]) -> Codec:
    names = set(parts)
    for codec_cls in CODECS.values():
        if set(codec_cls.part_names) == names:
            return codec_cls()
    raise ValueError(f"no codec stores the parts {sorted(names)}; codecs: {list(CODECS)}")


def decode_targets(
    targets: dict[str, dict[str, torch.Tensor]],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    mirror: torch.Tensor | None = None,
    projections: dict[str, Projection] | None = None,
) -> dict[str, torch.Tensor]:
    """Move each level's encoded payload to ``device`` (non-blocking from pinned memory), then decode there.

    ``mirror`` (B,) bool: rows whose decoded features are mirrored along W (a mirrored bank's flipped views):
    one ``torch.where`` on the device, no host sync. ``projections``: the bank's bases (``Bank.projections``,
    best moved to ``device`` once): a projected level's decoded coefficients go back to C channels there, one
    matmul (a 1x1 convolution) and the mean."""
    out = {}
    flip_B111 = (
        None
        if mirror is None or not len(mirror)
        else mirror.to(device, non_blocking=True)[:, None, None, None]
    )
    for level, parts in targets.items():
        moved = {name: t.to(device, non_blocking=True) for name, t in parts.items()}
        feats_BCHW = _codec_for_parts(moved).decode(moved, dtype)
        if projections and level in projections:
            feats_BCHW = projections[level].unproject(feats_BCHW, dtype)
        if flip_B111 is not None:
            feats_BCHW = torch.where(flip_B111, feats_BCHW.flip(-1), feats_BCHW)
        out[level] = feats_BCHW
    return out


def make_loader(
    path: str | Path,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 4,
    draw: str = "random",
    flip: str = "random",
    pin_memory: bool = True,
    levels: list[str] | None = None,
    verify_chunks: ChunkCheck = "first",
    labels: bool = False,
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """The training loader of one rank and its sampler (call ``sampler.set_epoch(e)`` each epoch); ``labels``:
    batches carry the bank's soft labels."""
    dataset = BankTrainSet(path, levels, verify_chunks=verify_chunks, labels=labels)
    sampler = EpochSampler(
        dataset.bank, batch_size, rank=rank, world_size=world_size, seed=seed, draw=draw, flip=flip
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_rows,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader, sampler


def decode_labels(
    payload: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A batch's soft labels (``batch["labels"]``, ``bank.labels``), moved to ``device`` (non-blocking from
    pinned memory) and decoded there: ``(B, K, h, w)`` logits. Each view's are its own (a mirrored bank stores
    both views' labels), so nothing is mirrored."""
    return decode_targets({"labels": payload}, device, dtype)["labels"]
