"""Several writers on one bank (issue 18, item 5): creation races end with one bank, shards are claimed so that
two processes split the work (each shard written exactly once), stale claims are taken over, orphaned
``.creating-*`` folders are removed."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from bank import Bank, BankError, BankWriter
from bank.config import BankConfig
from bank.layout import host_key, host_tag, side_dir
from bank.spec import claim_dir_name
from bank.verify import verify_bank
from tests.bank_helpers import make_spec, shard_rows

CFG = BankConfig(shard_rows=4, codec="int8", level_codecs={"s8": "fp16"})
ROUNDS = 3


def _racer(folder: str, barrier, results, name: str) -> None:
    """One encode process: per round, create the bank together with the other process, then claim and write
    every shard it can get."""
    try:
        spec = make_spec(CFG, num_images=10, draws=2, flips=2)  # 40 rows, 10 shards
        for round_ in range(ROUNDS):
            path = Path(folder) / f"bank{round_}.zarr"
            barrier.wait()  # started together
            writer = BankWriter.create(path, spec, CFG)
            written = []
            for shard in range(spec.num_shards):
                claim = writer.claim(shard, owner=name)
                if claim is None:
                    continue
                with claim:
                    time.sleep(0.02)  # a teacher pass: lets the other process claim the next shards
                    writer.write_shard(shard, shard_rows(spec, shard), claim=claim)
                    written.append(shard)
            results.put((name, round_, written, writer.path.name, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((name, -1, [], "", f"{type(exc).__name__}: {exc}"))


def test_two_processes_create_one_bank_and_split_its_shards(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), barrier, results, f"p{i}")) for i in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=240) for _ in range(2 * ROUNDS)]
    for p in procs:
        p.join(timeout=60)
    errors = [error for *_, error in got if error]
    assert not errors, errors
    spec = make_spec(CFG, num_images=10, draws=2, flips=2)
    for round_ in range(ROUNDS):
        by_process = {name: written for name, r, written, _, _ in got if r == round_}
        everything = sorted(by_process["p0"] + by_process["p1"])
        assert everything == list(range(spec.num_shards)), (round_, by_process)  # each shard exactly once
        assert by_process["p0"] and by_process["p1"], by_process  # both did work
        path = tmp_path / f"bank{round_}.zarr"
        assert verify_bank(path, progress=False).ok
        assert len(Bank.open(path).markers) == spec.num_shards
        assert not list((side_dir(path) / "claims").iterdir())  # every claim released with its marker
    leftovers = [p.name for p in tmp_path.iterdir() if ".creating-" in p.name or ".deleting-" in p.name]
    assert leftovers == []


def test_the_loser_of_a_creation_race_opens_the_winners_bank_or_refuses(tmp_path, monkeypatch):
    import bank.writer as writer_module

    spec = make_spec(CFG)
    other_cfg = BankConfig(shard_rows=4, codec="fp16")
    other = make_spec(other_cfg)
    real_build = writer_module._build_bank_folder
    winner: dict[str, BankWriter] = {}

    def build_then_lose(path, spec_, version, *rest):
        tmp = real_build(path, spec_, version, *rest)
        if "w" not in winner:  # the other process finishes first, while we built ours
            monkeypatch.setattr(writer_module, "_build_bank_folder", real_build)
            winner["w"] = BankWriter.create(path, spec, CFG)
        return tmp

    monkeypatch.setattr(writer_module, "_build_bank_folder", build_then_lose)
    loser = BankWriter.create(tmp_path / "same.zarr", spec, CFG)
    assert loser.bank_id == winner["w"].bank_id  # one bank
    # with other settings: a clear error, and the winner's bank is kept even with overwrite
    winner.clear()
    monkeypatch.setattr(writer_module, "_build_bank_folder", build_then_lose)
    with pytest.raises(
        BankError, match="another process created a different bank at .*differing settings"
    ) as info:
        BankWriter.create(tmp_path / "other.zarr", other, other_cfg, overwrite=True)
    assert "levels.s4.codec: 'int8' -> 'fp16'" in str(info.value)
    assert Bank.open(tmp_path / "other.zarr", require_complete=False).bank_id == winner["w"].bank_id
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_claims_exclusive_stale_taken_over_released_after_the_marker(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    a, b = BankWriter.create(path, spec, CFG), BankWriter.create(path, spec, CFG)
    claim = a.claim(0, owner="worker-a")
    assert claim is not None and b.claim(0, owner="worker-b") is None  # held by a live owner
    record = json.loads(claim.path.read_text())
    assert record["owner"] == "worker-a" and record["pid"] == os.getpid() and record["host"] == host_key()
    assert record["expires"] > time.time() + 60 and b.claim_holder(0)["owner"] == "worker-a"
    # released without the marker (a failed task): the next claimer takes it at once
    claim.release()
    again = b.claim(0, owner="worker-b")
    assert again is not None and again.gen == 1
    # written with the claim: marker, then the claim is gone and nobody can claim a done shard
    b.write_shard(0, shard_rows(spec, 0), claim=again)
    assert b.is_done(0) and not (side_dir(path) / claim_dir_name(0)).exists()
    assert a.claim(0) is None and again.released


def _stale_claim(writer: BankWriter, shard: int, gen: int, **fields) -> None:
    folder = writer.side / claim_dir_name(shard)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "owner": "ghost",
        "host": host_key(),
        "host_tag": host_tag(),
        "pid": os.getpid(),
        "token": "t",
        "bank_id": writer.bank_id,
        "expires": time.time() + 600,
        "released": False,
    } | fields
    (folder / f"{gen:06d}.json").write_text(json.dumps(record))


def test_stale_claims_are_taken_over(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    _stale_claim(writer, 0, 0, pid=dead.pid)  # this machine, process gone
    _stale_claim(writer, 1, 4, host="elsewhere/boot/1", pid=1, expires=time.time() - 1)  # lease lapsed
    _stale_claim(writer, 2, 0, host="elsewhere/boot/1", pid=1)  # another machine, lease running
    _stale_claim(writer, 3, 0, bank_id="0" * 32)  # a deleted bank's
    assert writer.claim(0).gen == 1 and writer.claim(1).gen == 5 and writer.claim(3).gen == 1
    assert writer.claim(2) is None
    assert writer.wait_for_shards([2], poll_s=0.05, timeout_s=0.2) == [2]  # still held: gave up waiting


def test_a_lost_claim_does_not_mark_the_shard_done(tmp_path):
    path = tmp_path / "b.zarr"
    spec = make_spec(CFG)
    writer = BankWriter.create(path, spec, CFG)
    claim = writer.claim(1)
    _stale_claim(writer, 1, claim.gen + 1, pid=os.getpid(), token="usurper")  # taken over meanwhile
    with pytest.raises(BankError, match="claim on shard 1 was lost"):
        writer.write_shard(1, shard_rows(spec, 1), claim=claim)
    assert not writer.is_done(1)
    claim.release()  # never touches the newer owner's claim
    assert writer.claim_holder(1)["token"] == "usurper"


def test_orphaned_creating_folders_are_removed_or_reported(tmp_path, caplog):
    dead = multiprocessing.get_context("spawn").Process(target=int)
    dead.start()
    dead.join()
    mine_dead = tmp_path / f".b.zarr.creating-{host_tag()}-{dead.pid}-abcd"
    old_style = tmp_path / ".b.zarr.creating-4242"  # written by the code before this change
    elsewhere_fresh = tmp_path / ".b.zarr.creating-0badf00d-17-abcd"
    elsewhere_old = tmp_path / ".b.zarr.creating-0badf00d-18-abcd"
    for folder in (mine_dead, old_style, elsewhere_fresh, elsewhere_old):
        (folder / "image").mkdir(parents=True)
    long_ago = time.time() - 3600
    for folder in (old_style, elsewhere_old):
        os.utime(folder, (long_ago, long_ago))
    os.utime(elsewhere_fresh, (time.time() - 120, time.time() - 120))
    with caplog.at_level(logging.WARNING, logger="bank.writer"):
        BankWriter.create(tmp_path / "b.zarr", make_spec(CFG), CFG)
    assert not mine_dead.exists() and not old_style.exists() and not elsewhere_old.exists()
    assert elsewhere_fresh.exists()  # maybe another machine's creation in progress: reported, kept
    text = caplog.text
    assert f"removed {mine_dead}" in text and f"left {elsewhere_fresh} in place" in text
