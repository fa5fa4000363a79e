"""Writer/reader round-trip, resume, refusal of mismatches, open-time errors, direct reader == zarr-python."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from bank import Bank, BankError, BankSpec, BankWriter
from bank.config import BankConfig
from bank.layout import array_defs, side_dir
from bank.spec import done_marker_name
from tests.bank_helpers import make_spec, shard_rows, write_bank

CFG = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"})


def test_row_layout():
    spec = make_spec(CFG, num_images=5)
    assert spec.num_rows == 20 and spec.num_shards == 3 and spec.images_per_shard == 2
    assert spec.row_index(3, 1, 0) == 14 and spec.shard_range(2) == range(16, 20)
    assert spec.shard_images(2) == range(4, 5)
    with pytest.raises(BankError, match="multiple of draws x flips"):
        make_spec(BankConfig(shard_rows=6), num_images=5)


@pytest.mark.parametrize("compressor", ["none", "blosc-lz4", "zstd"])
def test_round_trip_matches_written_rows(tmp_path, compressor):
    cfg = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"}, compressor=compressor)
    spec = write_bank(tmp_path / "b.zarr", cfg)
    bank = Bank.open(tmp_path / "b.zarr")
    assert bank.fingerprint == spec.fingerprint() and bank.num_rows == 20
    rows = [17, 0, 9, 3, 16]  # unordered, across all three shards (the last one short)
    batch = bank.read_rows(rows)
    decoded = bank.decode_rows(rows)
    for r_out, row in enumerate(rows):
        shard = row // 8
        written = shard_rows(spec, shard)
        local = row - shard * 8
        assert np.array_equal(batch["image"][r_out], written.images_u8[local])
        assert batch["draw"][r_out] == written.draw[local] and batch["seed"][r_out] == written.seed[local]
        for level in spec.levels:
            ref = written.features[level.name][local].numpy()
            codec = bank.codecs[level.name]
            bound = codec.error_bound(
                torch.from_numpy(ref)[None],
                {k: torch.from_numpy(v[r_out : r_out + 1]) for k, v in batch["targets"][level.name].items()},
            )
            assert np.all(np.abs(decoded[level.name][r_out] - ref) <= bound.numpy()[0])
    assert bank.keys([0, 4, 19]) == ["img/0000.png", "img/0001.png", "img/0004.png"]
    # the direct shard-file reader returns exactly what zarr-python reads
    group = zarr.open_group(tmp_path / "b.zarr", mode="r")
    for level, parts in batch["targets"].items():
        for part, values in parts.items():
            assert np.array_equal(group[f"features/{level}/{part}"].oindex[rows], values)


def test_rewrite_gives_identical_bytes_and_resume(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    writer.write_shard(1, shard_rows(spec, 1))
    assert writer.pending_shards() == [0, 2]
    snapshot = {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and "/c/" in str(p)}
    # a second process resumes: same fingerprint -> opened, shard 1 rewritten byte-identically
    again = BankWriter.create(path, spec, CFG)
    assert again.pending_shards() == [0, 2]
    again.write_shard(1, shard_rows(spec, 1))
    assert all(p.read_bytes() == b for p, b in snapshot.items())
    with pytest.raises(BankError, match="incomplete"):
        Bank.open(path)
    partial = Bank.open(path, require_complete=False)
    assert partial.image_ok.tolist() == [False, False, True, True, False]
    with pytest.raises(BankError, match="not written"):
        partial.read_rows([0])


def test_mismatch_refused_and_overwrite(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    other = make_spec(BankConfig(shard_rows=8, codec="fp16"))
    with pytest.raises(BankError) as info:
        BankWriter.create(path, other, BankConfig(shard_rows=8, codec="fp16"))
    assert "levels.s4.codec: 'int8' -> 'fp16'" in str(info.value) and "--overwrite" in str(info.value)
    BankWriter.create(path, other, BankConfig(shard_rows=8, codec="fp16"), overwrite=True)
    assert Bank.open(path, require_complete=False).spec.levels[1].codec == "fp16"


def test_spec_must_agree_with_config(tmp_path):
    with pytest.raises(BankError, match="shard_rows: spec 8, bank config 16"):
        BankWriter.create(
            tmp_path / "b.zarr", make_spec(CFG), BankConfig(shard_rows=16, level_codecs={"s8": "fp16"})
        )


def test_truncated_or_missing_shard_is_an_open_error(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    shard_file = path / "features/s4/q/c/1/0/0/0"
    data = shard_file.read_bytes()
    shard_file.write_bytes(data[:-100])
    with pytest.raises(BankError, match=r"shard 1 file features/s4/q/c/1/0/0/0 is truncated"):
        Bank.open(path)
    shard_file.unlink()
    with pytest.raises(BankError, match="is missing"):
        Bank.open(path)


def test_unknown_version_and_edited_attributes(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["dreamteacher_bank"]["spec"]["attributes"]["encoding"]["t"] = 150
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BankError, match="fingerprint"):
        Bank.open(path)
    meta["attributes"]["dreamteacher_bank"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BankError, match="format version 99"):
        Bank.open(path)
    with pytest.raises(BankError, match="no bank"):
        Bank.open(tmp_path / "nothing.zarr")


def test_rejects_and_summary(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_rows(spec, shard, rejected_images=(3,)))
    writer.finalize({"seconds": 1.5})
    bank = Bank.open(path)
    assert bank.rejects == {"img/0003.png": "unreadable"}
    assert bank.image_ok.tolist() == [True, True, True, False, True]
    summary = bank.summary()
    assert summary["rows_ok"] == 16 and summary["seconds"] == 1.5 and summary["rejects"] == bank.rejects


def test_plain_zarr_can_decode_a_row_by_hand(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    group = zarr.open_group(path, mode="r")  # what docs/bank-format.md shows
    q, scale, offset = (
        group["features/s4/q"][5],
        group["features/s4/scale"][5],
        group["features/s4/offset"][5],
    )
    by_hand = (
        q.astype(np.float32) * scale.astype(np.float32)[:, None, None]
        + offset.astype(np.float32)[:, None, None]
    )
    assert np.array_equal(by_hand, Bank.open(path).decode_rows([5])["s4"][0])
    assert bytes(group["key"][5]).rstrip(b"\0").decode() == "img/0001.png"
    assert BankSpec.from_dict(dict(group.attrs)["dreamteacher_bank"]["spec"]).num_rows == 20


def test_writer_checks_rows(tmp_path):
    spec = make_spec(CFG)
    writer = BankWriter.create(tmp_path / "b.zarr", spec, CFG)
    rows = shard_rows(spec, 0)
    rows.flip = rows.flip[::-1].copy()
    with pytest.raises(BankError, match="row layout"):
        writer.write_shard(0, rows)
    assert not os.path.exists(side_dir(tmp_path / "b.zarr") / done_marker_name(0))


def test_all_zero_row_arrays_are_still_written(tmp_path):
    # one draw, no flips: draw and flip are all zero, which zarr would otherwise skip as "empty" chunks
    spec = write_bank(
        tmp_path / "b.zarr", BankConfig(shard_rows=2, level_codecs={"s8": "fp16"}), draws=1, flips=1
    )
    bank = Bank.open(tmp_path / "b.zarr")
    assert bank.num_rows == spec.num_rows == 5 and bank.read_rows([4])["draw"].tolist() == [0]


@pytest.mark.parametrize("format_version", [2, 1])
@pytest.mark.parametrize("compressor", ["none", "blosc-lz4", "zstd"])
def test_direct_shard_files_are_the_bytes_zarr_writes(tmp_path, compressor, format_version):
    # The writer writes shard files itself (bank.layout.write_shard_file / write_raw_chunk). Read that bank back
    # with zarr-python, write the same arrays through zarr-python into an empty bank of the same spec, and every
    # data file must be byte-identical (the short last shard included). Version 2 adds zarr's crc32c codec
    # after every inner chunk (and every per-row chunk); version 1 (no per-chunk checksum) is still written
    # for resuming old banks and as their test fixture.
    cfg = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"}, compressor=compressor)
    spec = write_bank(tmp_path / "direct.zarr", cfg, format_version=format_version)
    BankWriter.create(tmp_path / "zarr.zarr", spec, cfg, format_version=format_version)
    codecs = json.loads((tmp_path / "zarr.zarr/image/zarr.json").read_text())["codecs"][0]["configuration"]
    assert (codecs["codecs"][-1]["name"] == "crc32c") == (format_version == 2)
    direct = zarr.open_group(tmp_path / "direct.zarr", mode="r")
    through_zarr = zarr.open_group(tmp_path / "zarr.zarr", mode="r+")
    for adef in array_defs(spec):
        through_zarr[adef.path].with_config({"write_empty_chunks": True})[:] = direct[adef.path][:]
    files = 0
    for adef in array_defs(spec):
        for shard in range(spec.num_shards):
            ours = adef.shard_file(tmp_path / "direct.zarr", shard).read_bytes()
            assert ours == adef.shard_file(tmp_path / "zarr.zarr", shard).read_bytes(), (adef.path, shard)
            files += 1
    assert files == len(array_defs(spec)) * 3


def test_marker_absmax_is_max_abs_over_ok_rows(tmp_path):
    spec = make_spec(CFG)
    writer = BankWriter.create(tmp_path / "b.zarr", spec, CFG)
    rows = shard_rows(spec, 0, rejected_images=(1,))
    rows.features["s4"][0, 0, 0, 0] = -1e4  # a negative extreme on an OK row
    rows.features["s8"][4, 0, 0, 0] = 1e4  # an extreme on a rejected row (image 1) must not count
    writer.write_shard(0, rows)
    marker = json.loads((side_dir(tmp_path / "b.zarr") / done_marker_name(0)).read_text())
    for level, feats in rows.features.items():
        ok = feats.numpy()[rows.ok]
        assert marker["absmax"][level] == float(np.abs(ok).max())
    assert marker["absmax"]["s4"] == 1e4
