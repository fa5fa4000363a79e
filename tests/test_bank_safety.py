"""Data safety of the bank (issue 18, items 2, 3, 14, 16, 17): per-chunk checksums checked on read, per-row
arrays checked at open, v1 banks still open (and say what they lack), durable writes (fsync before the marker),
side files outside the Zarr group, and one-line errors that name the file and the fix."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from bank import Bank, BankError, BankTrainSet, BankWriter, collate_rows
from bank.config import BankConfig
from bank.layout import SIDE_SUFFIX, SUMMARY_FILE, array_defs, side_dir
from bank.reader import BankFormatWarning
from bank.spec import FORMAT_VERSION, done_marker_name
from bank.verify import verify_bank
from dreamteacher.commands.bank import bank as bank_cli
from tests.bank_helpers import make_spec, shard_rows, write_bank

CFG = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"})


def _flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


# ---- item 2: checksums ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressor", ["none", "blosc-lz4"])
def test_a_flipped_byte_in_a_feature_chunk_is_an_error_when_read(tmp_path, compressor, small_files):
    path = tmp_path / "b.zarr"
    cfg = BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"}, compressor=compressor)
    write_bank(path, cfg)
    shard_file = path / "features/s4/q/c/1/0/0/0"
    bank = Bank.open(path)
    first = int(bank._files.get(bank.array_defs(["s4"])[1], 1).index[1, 0])  # row 9's chunk
    _flip_byte(shard_file, first + 3)
    bank = Bank.open(path)  # same size: open-time checks pass, as before
    with pytest.raises(BankError) as info:
        bank.read_rows([12, 9])
    message = _one_line(info.value)
    for part in ("shard 1", "row 9", "features/s4/q/c/1/0/0/0", "crc32c", "Repair: delete", "000001.json"):
        assert part in message, (part, message)
    # the other rows, even of the same shard and file, still read
    assert bank.read_rows([8, 10, 16])["image"].shape[0] == 3
    # distill's dataset sees the same error, and so does plain zarr (the crc32c codec is in the metadata)
    with pytest.raises(BankError, match="row 9"):
        BankTrainSet(path).__getitems__([9])
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(path, mode="r")["features/s4/q"][9]
    # turning the check off is possible (measured cost: docs/benchmarks.md), and then the bytes come back
    assert Bank.open(path, verify_chunks="never").read_rows([9])["image"].shape == (1, 3, 16, 16)
    # checking each chunk only the first time it is read (training's default) still stops its first read, and
    # a retry in the same process (a loop that caught the error) is stopped again: a failed chunk is not checked
    first = Bank.open(path, verify_chunks="first")
    for _ in range(2):
        with pytest.raises(BankError, match="row 9 fails its crc32c"):
            first.read_rows([8, 9])


def _flip_row_9_of_s4(path: Path) -> None:
    bank = Bank.open(path, verify_chunks="never")
    first = int(bank._files.get(bank.array_defs(["s4"])[1], 1).index[1, 0])
    _flip_byte(path / "features/s4/q/c/1/0/0/0", first + 3)


def test_first_read_checks_trust_what_this_process_checked_and_always_rechecks(tmp_path, monkeypatch):
    """The trade ``verify_chunks="first"`` makes (and its docs state): a chunk checked once is trusted by this
    process afterwards, so bytes that change on disk later go unseen there; ``always`` sees them; a new process
    (a re-opened bank, a forked DataLoader worker) checks again."""
    from bank import layout

    monkeypatch.setattr(layout, "SMALL_SHARD_FILE", 0)  # read from the file on every read
    path = tmp_path / "b.zarr"
    write_bank(path, CFG)
    first, always = Bank.open(path, verify_chunks="first"), Bank.open(path, verify_chunks="always")
    clean = first.read_rows([9])["targets"]["s4"]["q"].copy()
    always.read_rows([9])
    _flip_row_9_of_s4(path)
    changed = first.read_rows([9])["targets"]["s4"]["q"]  # trusted: not checked again
    assert not np.array_equal(changed, clean)
    with pytest.raises(BankError, match="row 9 fails its crc32c"):
        always.read_rows([9])
    with pytest.raises(BankError, match="row 9 fails its crc32c"):
        Bank.open(path, verify_chunks="first").read_rows([9])


def test_a_forked_loader_worker_checks_chunks_its_parent_checked(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path, CFG)
    dataset = BankTrainSet(path)  # verify_chunks="first", the training default
    assert dataset.__getitems__([9])["image"].shape[0] == 1  # checked in the parent
    _flip_row_9_of_s4(path)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[[9]], collate_fn=collate_rows, num_workers=1, multiprocessing_context="fork"
    )
    with pytest.raises(BankError, match="row 9 fails its crc32c"):
        next(iter(loader))


def test_a_flipped_byte_in_a_pixel_chunk_is_an_error_when_read(tmp_path, small_files):
    path = tmp_path / "b.zarr"
    write_bank(path)
    _flip_byte(path / "image/c/2/0/0/0", 5)  # row 16, the first of the short last shard
    with pytest.raises(BankError, match=r"shard 2 file image/c/2/0/0/0: row 16 fails its crc32c"):
        Bank.open(path).read_rows([16])


def test_a_corrupt_shard_index_is_an_error(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    file = path / "features/s8/values/c/0/0/0/0"
    _flip_byte(file, file.stat().st_size - 20)
    with pytest.raises(BankError, match="shard index fails its crc32c"):
        Bank.open(path).read_rows([0])


@pytest.mark.parametrize("array", ["ok", "seed", "key"])
def test_per_row_arrays_are_checked_at_open(tmp_path, array):
    path = tmp_path / "b.zarr"
    write_bank(path)
    _flip_byte(path / array / "c" / ("1/0" if array == "key" else "1"), 2)
    with pytest.raises(BankError) as info:
        Bank.open(path)
    message = _one_line(info.value)
    assert f"shard 1 (rows 8..15) file {array}/c/1" in message and "Repair: delete" in message
    # `bank info` refuses the bank too (it opens it); `bank verify` reports it instead of failing
    result = CliRunner().invoke(bank_cli, ["info", str(path)])
    assert isinstance(result.exception, BankError)
    result = CliRunner().invoke(bank_cli, ["verify", "--no-progress", str(path)])
    assert result.exit_code == 1 and "shard 1: checksum mismatch" in result.output


def test_the_writer_records_the_crc32c_codec_in_every_array(tmp_path):
    path = tmp_path / "b.zarr"
    spec = write_bank(path)
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["dreamteacher_bank"]
    assert (
        meta["format_version"] == spec.format_version() == 2
        and FORMAT_VERSION == 3
        and len(meta["bank_id"]) == 32
    )
    for adef in array_defs(spec):
        codecs = json.loads((path / adef.path / "zarr.json").read_text())["codecs"]
        if adef.sharded:
            inner = codecs[0]["configuration"]["codecs"]
            assert [c["name"] for c in inner] == ["bytes", "crc32c"], adef.path
        else:
            assert [c["name"] for c in codecs] == ["bytes", "crc32c"], adef.path


# ---- item 2: v1 banks -----------------------------------------------------------------------------------------
def test_v1_bank_still_opens_and_says_it_has_no_chunk_checksums(tmp_path):
    path = tmp_path / "v1.zarr"
    spec = write_bank(path, format_version=1)
    # the v1 layout: side files inside the group, no crc32c after the chunks
    assert (path / done_marker_name(0)).exists() and (path / SUMMARY_FILE).exists()
    assert side_dir(path) == path and not path.with_name(path.name + SIDE_SUFFIX).exists()
    inner = json.loads((path / "image/zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes"]
    with pytest.warns(BankFormatWarning, match="no per-chunk checksum"):
        bank = Bank.open(path)
    assert bank.format_version == 1 and not bank.chunk_checksums and bank.summary()["rows_ok"] == 20
    reference = write_bank(tmp_path / "v2.zarr")
    assert reference.fingerprint() == spec.fingerprint()
    v2 = Bank.open(tmp_path / "v2.zarr")
    rows = [17, 0, 9, 3]
    with pytest.warns(BankFormatWarning):
        got = Bank.open(path).read_rows(rows)
    want = v2.read_rows(rows)
    assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["seed"], want["seed"])
    for level, parts in want["targets"].items():
        for part, values in parts.items():
            assert np.array_equal(got["targets"][level][part], values)
    # `bank info` says so in words; `bank verify` passes with a note
    runner = CliRunner()
    result = runner.invoke(bank_cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "format v1" in result.output and "NONE per chunk" in result.output
    result = runner.invoke(bank_cli, ["verify", "--no-progress", str(path)])
    assert result.exit_code == 0 and "no per-chunk checksum" in result.output
    # per-row arrays are still checked at open (against the v1 markers' crc32) ...
    _flip_byte(path / "ok/c/0", 1)
    with pytest.raises(BankError, match="ok/c/0 does not match"), pytest.warns(BankFormatWarning):
        Bank.open(path)


def test_v1_feature_corruption_is_found_by_verify_only(tmp_path):
    path = tmp_path / "v1.zarr"
    write_bank(path, format_version=1)
    _flip_byte(path / "features/s4/q/c/1/0/0/0", 40)
    with pytest.warns(BankFormatWarning):
        Bank.open(path).read_rows([8])  # no per-chunk checksum: nothing to check against while reading
    report = verify_bank(path, progress=False)
    assert not report.ok and report.bad_shards == {1}


def test_a_v1_bank_is_resumed_in_its_own_layout(tmp_path):
    path = tmp_path / "v1.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG, format_version=1)
    writer.write_shard(0, shard_rows(spec, 0))
    again = BankWriter.create(path, spec, CFG)  # the current code, format 2 by default
    assert again.format_version == 1 and again.side == path and again.pending_shards() == [1, 2]
    for shard in again.pending_shards():
        again.write_shard(shard, shard_rows(spec, shard))
    with pytest.warns(BankFormatWarning):
        bank = Bank.open(path)
    assert len(bank.markers) == 3
    assert verify_bank(path, progress=False).ok


# ---- item 3: durability ---------------------------------------------------------------------------------------
def test_files_and_folders_are_fsynced_before_the_marker_is_renamed(tmp_path, monkeypatch):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    writer.write_shard(1, shard_rows(spec, 1))
    marker = str(side_dir(path) / done_marker_name(1))
    marker_at = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(marker))
    synced_before = {what for kind, what in events[:marker_at] if kind == "fsync"}
    renames = [what.split(" -> ") for kind, what in events[:marker_at] if kind == "rename"]
    data_files = [adef.shard_file(path, 1) for adef in array_defs(spec)]
    assert len(renames) == len(data_files)
    for tmp, final in renames:
        # each file's bytes were synced under its temporary name before it was renamed into place ...
        at = events.index(("rename", f"{tmp} -> {final}"))
        assert ("fsync", tmp) in events[:at], final
        # ... and the folder holding its new entry before the marker (and the folders created for it)
        assert str(Path(final).parent) in synced_before, final
    assert {str(f) for f in data_files} == {final for _, final in renames}
    for created in ("image/c/1", "image/c/1/0", "image/c/1/0/0", "ok/c"):
        assert str((path / created).parent) in synced_before, created
    # the marker itself: synced before its rename, its folder after it
    assert ("fsync", str(Path(marker).parent)) in events[marker_at:]
    assert any(kind == "fsync" and Path(what).name.startswith(".000001.json.tmp-") for kind, what in events)


def test_a_killed_writers_temporary_files_are_removed_on_rewrite(tmp_path):
    from bank.layout import host_tag

    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    writer.write_shard(0, shard_rows(spec, 0))
    folder = path / "image/c/0/0/0"
    dead = folder / f".0.tmp-{host_tag()}-999999999-abcd"
    live = folder / f".0.tmp-{host_tag()}-{os.getpid()}-abcd"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    writer.write_shard(0, shard_rows(spec, 0))
    assert not dead.exists() and live.exists()


# ---- item 14: one-line errors ---------------------------------------------------------------------------------
def test_disk_full_while_writing_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    real_writev = os.writev

    def full(fd, buffers):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(path / "image")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full)
    with pytest.raises(BankError) as info:
        writer.write_shard(0, shard_rows(spec, 0))
    message = _one_line(info.value)
    assert (
        "no space left" in message and str(path / "image/c/0/0/0/0") in message and "re-run encode" in message
    )
    assert not writer.is_done(0)
    assert not [p for p in path.rglob(".*.tmp-*")]  # no temporary file left behind
    monkeypatch.setattr(os, "writev", real_writev)

    def full_at_fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", full_at_fsync)
    with pytest.raises(BankError, match=r"no space left on the device while writing .*b\.zarr"):
        writer.write_shard(0, shard_rows(spec, 0))


def test_missing_bank_and_invalid_metadata_are_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(bank_cli, ["info", str(tmp_path / "nothing.zarr")])
    message = _one_line(result.exception)
    assert isinstance(result.exception, BankError)
    assert "no bank at" in message and "nothing.zarr" in message and "dreamteacher encode" in message
    path = tmp_path / "b.zarr"
    write_bank(path)
    array_meta = path / "features/s4/q/zarr.json"
    saved = array_meta.read_text()
    array_meta.write_text(saved[:-30])
    with pytest.raises(BankError) as info:
        Bank.open(path)
    assert f"{array_meta} is not valid JSON" in str(info.value)
    array_meta.write_text(saved)
    (path / "zarr.json").write_text("{not json")
    for command in (["info"], ["verify"], ["show", "--row", "1"]):
        result = runner.invoke(bank_cli, [*command, str(path)])
        assert isinstance(result.exception, BankError), command
        message = _one_line(result.exception)
        assert f"{path / 'zarr.json'} is not valid JSON" in message and "--overwrite" in message
    # a different bank at the path: the hint names the real flag, not a config key
    with pytest.raises(BankError) as info:
        BankWriter.create(tmp_path / "other.zarr", make_spec(CFG), CFG)
        BankWriter.create(
            tmp_path / "other.zarr",
            make_spec(BankConfig(shard_rows=8, codec="fp16")),
            BankConfig(shard_rows=8, codec="fp16"),
        )
    assert "dreamteacher encode --overwrite" in str(info.value) and "encode.overwrite" not in str(info.value)


# ---- item 17: show and verify ---------------------------------------------------------------------------------
def test_show_says_a_row_is_rejected_and_refuses_rows_out_of_range(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_rows(spec, shard, rejected_images=(1,)))
    runner = CliRunner()
    out = tmp_path / "row.png"
    result = runner.invoke(bank_cli, ["show", str(path), "--row", "5", "--out", str(out)])  # image 1
    assert result.exit_code == 0, result.output
    assert "row 5 (img/0001.png) is a REJECTED image: unreadable" in result.output and out.exists()
    result = runner.invoke(bank_cli, ["show", str(path), "--row", "3", "--out", str(out)])
    assert result.exit_code == 0 and "REJECTED" not in result.output
    result = runner.invoke(bank_cli, ["show", str(path), "--row", "999", "--out", str(out)])
    message = _one_line(result.exception)
    assert isinstance(result.exception, BankError) and "--row 999 is out of range" in message
    assert "20 rows (0..19)" in message


def test_verify_gives_the_repair_step_and_unmark_then_encode_repairs(tmp_path):
    path = tmp_path / "b.zarr"
    spec = write_bank(path)
    _flip_byte(path / "features/s4/q/c/1/0/0/0", 12)
    runner = CliRunner()
    result = runner.invoke(bank_cli, ["verify", "--no-progress", str(path)])
    assert result.exit_code == 1
    marker = side_dir(path) / done_marker_name(1)
    assert "shard 1: checksum mismatch" in result.output and f"Repair: delete {marker}" in result.output
    assert "re-run the same `dreamteacher encode` command" in result.output
    result = runner.invoke(bank_cli, ["verify", "--no-progress", "--unmark", str(path)])
    assert result.exit_code == 1 and "withdrew 1 done marker(s) (shards [1])" in result.output
    writer = BankWriter.create(path, spec, CFG)  # what re-running encode does
    assert writer.pending_shards() == [1]
    writer.write_shard(1, shard_rows(spec, 1))
    assert runner.invoke(bank_cli, ["verify", "--no-progress", str(path)]).exit_code == 0


# ---- item 16: side files outside the group --------------------------------------------------------------------
def test_plain_zarr_sees_only_zarr_nodes(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    (side_dir(path) / "config.yaml").write_text("encode: {}\n")  # what encode saves there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(path, mode="r")
        names = {name for name, _ in group.members()}
        everything = dict(group.members(max_depth=None))
    assert names == {"image", "features", "key", "source_index", "draw", "flip", "seed", "ok"}
    assert "features/s4/q" in everything
    assert side_dir(path) == tmp_path / "b.zarr.side"
    assert sorted(p.name for p in side_dir(path).iterdir()) == ["config.yaml", "done", "summary.json"]
    assert side_dir(tmp_path / "new.zarr") == tmp_path / "new.zarr.side"  # before it exists, too


def test_a_deleted_banks_side_files_are_ignored(tmp_path):
    path = tmp_path / "b.zarr"
    spec = write_bank(path)
    shutil.rmtree(path)  # the user deletes the group only; its side folder stays
    writer = BankWriter.create(path, spec, CFG)
    assert writer.pending_shards() == [0, 1, 2]  # the old markers are another bank's
    bank = Bank.open(path, require_complete=False)
    assert bank.markers == {} and bank.summary() is None and not bank.ok.any()
    writer.write_shard(0, shard_rows(spec, 0))
    assert writer.pending_shards() == [1, 2]


def test_the_cli_prints_bank_errors_as_one_error_line(tmp_path):
    from dreamteacher.cli import main

    path = tmp_path / "b.zarr"
    write_bank(path)
    runner = CliRunner()
    result = runner.invoke(main, ["bank", "info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: no bank at") and result.output.count("\n") == 1
    result = runner.invoke(
        main, ["bank", "show", str(path), "--row", "999", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and result.output.startswith("Error: --row 999 is out of range")
