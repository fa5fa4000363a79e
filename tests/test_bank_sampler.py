"""EpochSampler: rank coverage, exact mid-epoch resume, per-epoch view choice; DataLoader with forked workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bank import Bank, BankTrainSet, EpochSampler, collate_rows, decode_targets, make_loader
from bank.config import BankConfig
from tests.bank_helpers import make_spec, write_bank

SPEC = make_spec(BankConfig(shard_rows=8, level_codecs={"s8": "fp16"}), num_images=24)


def images_of(rows: list[int]) -> list[int]:
    return [r // SPEC.views_per_image for r in rows]


def test_ranks_disjoint_and_cover_each_image_once():
    seen = []
    for rank in range(3):
        sampler = EpochSampler(SPEC, 4, rank=rank, world_size=3, seed=1)
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        seen += [img for batch in batches for img in images_of(batch)]
    assert sorted(seen) == list(range(24))


def test_block_shuffle_keeps_batches_shard_local():
    sampler = EpochSampler(SPEC, 4, seed=0, window=1)
    for batch in sampler:
        assert len({r // SPEC.shard_rows for r in batch}) <= 2
    # and the order still changes from epoch to epoch
    sampler.set_epoch(1)
    assert list(sampler) != list(EpochSampler(SPEC, 4, seed=0, window=1))


def test_resume_mid_epoch_has_no_repeats_or_gaps():
    full = EpochSampler(SPEC, 2, seed=5)
    full.set_epoch(3)
    expected = list(full)
    first = EpochSampler(SPEC, 2, seed=5)
    first.set_epoch(3)
    consumed = [b for _, b in zip(range(5), first, strict=False)]
    state = first.state_dict(batches_done=5)
    resumed = EpochSampler(SPEC, 2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert consumed + list(resumed) == expected
    resumed.set_epoch(4)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(resumed)
    with pytest.raises(ValueError, match="batch_size 2 -> 4"):
        EpochSampler(SPEC, 4, seed=5).load_state_dict(state)


def test_view_choice_per_epoch():
    draws, flips = set(), set()
    for epoch in range(6):
        s = EpochSampler(SPEC, 4, seed=0)
        s.set_epoch(epoch)
        rows = np.concatenate([np.array(b) for b in s])
        draws |= set(((rows // SPEC.flips) % SPEC.draws).tolist())
        flips |= set((rows % SPEC.flips).tolist())
    assert draws == {0, 1} and flips == {0, 1}
    fixed = np.concatenate([np.array(b) for b in EpochSampler(SPEC, 4, draw="first", flip="none")])
    assert set((fixed % SPEC.views_per_image).tolist()) == {0}


def test_rejected_images_are_skipped_and_dataset_batches(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path, num_images=6)
    dataset = BankTrainSet(path, levels=["s4"])
    batch = collate_rows(dataset.__getitems__([3, 1]))
    assert batch["image"].shape == (2, 3, 16, 16) and set(batch["targets"]) == {"s4"}
    stacked = collate_rows([dataset[3], dataset[1]])
    assert torch.equal(stacked["targets"]["s4"]["q"], batch["targets"]["s4"]["q"])
    decoded = decode_targets(batch["targets"], "cpu")
    assert torch.equal(decoded["s4"], torch.from_numpy(Bank.open(path).decode_rows([3, 1])["s4"]))


def test_dataloader_with_two_forked_workers(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path, num_images=12)
    loader, sampler = make_loader(path, 2, num_workers=2, seed=3, pin_memory=False)
    assert (
        loader.multiprocessing_context is None or loader.multiprocessing_context.get_start_method() == "fork"
    )
    bank = Bank.open(path)
    sampler.set_epoch(1)
    rows = []
    for batch in loader:
        rows += batch["row"].tolist()
        ref = bank.read_rows(batch["row"].tolist())
        assert np.array_equal(batch["targets"]["s4"]["q"].numpy(), ref["targets"]["s4"]["q"])
        assert np.array_equal(batch["image"].numpy(), ref["image"])
    assert sorted(r // SPEC.views_per_image for r in rows) == list(range(12))
