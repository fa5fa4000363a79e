"""The fast reader's own paths: batched/merged shard-file reads == zarr-python for any row order (files read
chunk by chunk and small files read whole), one preadv per run of back-to-back chunks, and batch-buffer reuse
that never overwrites a batch someone still holds."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import zarr

from bank import Bank, BankTrainSet, EpochSampler, collate_rows
from bank import layout as bank_layout
from bank.config import BankConfig
from bank.layout import array_defs
from bank.reader import BufferPool
from tests.bank_helpers import write_bank

ROW_ORDERS = {
    "contiguous": list(range(0, 8)),  # one whole shard: one run per array
    "reversed": list(range(19, 3, -1)),  # back-to-back chunks requested out of order, across shards
    "duplicates": [5, 5, 6, 4, 5, 17],  # a row twice in a batch
    "scattered": [17, 0, 9, 3, 16, 11, 2],
    "empty": [],
}


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("compressor", ["none", "blosc-lz4"])
@pytest.mark.parametrize("order", list(ROW_ORDERS))
def test_read_rows_equals_zarr_for_any_row_order(tmp_path, compressor, order, small_files):
    cfg = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"}, compressor=compressor)
    spec = write_bank(tmp_path / "b.zarr", cfg)
    bank = Bank.open(tmp_path / "b.zarr")
    group = zarr.open_group(tmp_path / "b.zarr", mode="r")
    rows = ROW_ORDERS[order]
    batch = bank.read_rows(rows)
    assert np.array_equal(batch["image"], group["image"].oindex[rows] if rows else batch["image"])
    assert batch["image"].shape == (len(rows), 3, spec.image_size, spec.image_size)
    for d in array_defs(spec):
        if d.sharded and d.path != "image":
            got = batch["targets"][d.level][d.part]
            assert got.dtype == np.dtype(d.dtype) and got.shape == (len(rows), *d.row_shape)
            if rows:
                assert np.array_equal(got, group[d.path].oindex[rows]), d.path
    assert batch["row"].tolist() == rows and batch["seed"].tolist() == [r * 7 for r in rows]


def test_back_to_back_chunks_are_one_preadv(tmp_path, monkeypatch):
    monkeypatch.setattr(bank_layout, "SMALL_SHARD_FILE", 0)
    spec = write_bank(tmp_path / "b.zarr")
    bank = Bank.open(tmp_path / "b.zarr")
    sharded = [d for d in array_defs(spec) if d.sharded]
    calls: list[int] = []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        calls.append(len(buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counting_preadv)
    bank.read_rows([3, 1, 2, 0, 4, 5, 7, 6])  # a whole shard in shuffled order
    # one syscall per array: all 8 rows scattered to their slots, each chunk's crc32c to a side buffer
    assert calls == [2 * 8] * len(sharded)
    calls.clear()
    bank.read_rows([0, 2, 9])  # no two chunks adjacent in a file
    assert calls == [2] * (3 * len(sharded))  # one chunk (+ its crc32c) per syscall


def test_small_files_are_read_once_when_opened(tmp_path, monkeypatch):
    write_bank(tmp_path / "b.zarr")  # every shard file of this bank is under SMALL_SHARD_FILE
    bank = Bank.open(tmp_path / "b.zarr")
    first = bank.read_rows([3, 1, 9])
    reads: list[str] = []
    for name in ("preadv", "pread"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name: reads.append(_name) or _real(*a))
    again = bank.read_rows([9, 3, 1, 2])  # shards 0 and 1 are open: their files are in memory
    assert reads == []
    assert np.array_equal(again["image"][:3], first["image"][[2, 0, 1]])
    bank.read_rows([16])  # shard 2: each of its files read whole once (one pread each), then gathered
    assert set(reads) == {"pread"}


def test_buffer_pool_hands_out_only_unreferenced_buffers():
    pool = BufferPool(capacity=2)
    a, b = pool.take(100), pool.take(100)
    assert not np.shares_memory(a, b)
    address_a = _address(a)
    c = pool.take(100)  # both pooled buffers busy: a fresh one, outside the pool
    assert not np.shares_memory(c, a) and not np.shares_memory(c, b)
    del a
    d = pool.take(60)  # a's buffer is free again: reused
    assert _address(d) == address_a
    # a torch tensor made from a view keeps the buffer busy
    held = torch.from_numpy(d[10:20].view(np.int16))
    del d
    e = pool.take(100)
    assert _address(e) != address_a and not np.shares_memory(e, b)
    del held, e
    f = pool.take(200)  # a free buffer too small for the request is replaced, not overrun
    assert f.nbytes == 200
    f[:] = 7
    assert np.all(f == 7)


def test_a_held_batch_is_never_overwritten(tmp_path):
    write_bank(tmp_path / "b.zarr")
    bank = Bank.open(tmp_path / "b.zarr")
    dataset = BankTrainSet(tmp_path / "b.zarr")
    first = bank.read_rows([0, 1, 2, 3])
    first_tensors = dataset.__getitems__([8, 9, 10])
    reference = {k: first["targets"]["s4"][k].copy() for k in first["targets"]["s4"]}
    reference_image = first_tensors["image"].clone()
    for rows in ([4, 5, 6, 7], [16, 17, 18, 19], [12, 13, 14, 15]):  # would land in the same buffers
        bank.read_rows(rows)
        dataset.__getitems__(rows)
    for part, values in reference.items():
        assert np.array_equal(first["targets"]["s4"][part], values)
    assert torch.equal(first_tensors["image"], reference_image)
    # and the buffers do get reused once nothing holds a batch
    before = _address(bank.read_rows([4, 5, 6, 7])["image"])
    assert _address(bank.read_rows([16, 17, 18, 19])["image"]) == before


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_batches_kept_by_the_trainer_stay_intact(tmp_path, num_workers):
    write_bank(tmp_path / "b.zarr", num_images=8)
    bank = Bank.open(tmp_path / "b.zarr")
    dataset = BankTrainSet(tmp_path / "b.zarr")
    sampler = EpochSampler(bank, 2, seed=3)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_rows,
        num_workers=num_workers,
        multiprocessing_context="fork" if num_workers else None,
    )
    kept = list(loader)  # every batch held at once
    assert len(kept) == len(sampler) == 4
    for batch in kept:
        fresh = Bank.open(tmp_path / "b.zarr").read_rows(batch["row"].tolist())
        assert np.array_equal(batch["image"].numpy(), fresh["image"])
        for level, parts in fresh["targets"].items():
            for part, values in parts.items():
                assert np.array_equal(batch["targets"][level][part].numpy(), values)
