"""Soft labels in a bank (``bank.labels``): round trips per codec, one entry per training view, the bank's identity
untouched, kill -9 + resume to identical bytes, and one-line errors for missing, partial, other or damaged labels."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from bank_helpers import write_bank

from bank import Bank, BankError, BankTrainSet, LabelsSpec, LabelsWriter, decode_labels
from bank.config import BankConfig
from bank.layout import side_dir
from bank.verify import verify_bank

ROOT = Path(__file__).resolve().parents[1]
K, SIZE = 3, 4  # the helper banks' images are 16 px: labels at stride 4


def labels_spec(codec: str = "fp16", sha: str = "a" * 64) -> LabelsSpec:
    return LabelsSpec(
        num_classes=K, height=SIZE, width=SIZE, stride=4, codec=codec, interpreter={"sha256": sha}
    )


def logits_of(views: range) -> torch.Tensor:
    """Deterministic logits of a shard's views: view v holds v everywhere in class 0 (findable after a read),
    noise in the others."""
    g = torch.Generator().manual_seed(views.start)
    out = torch.randn(len(views), K, SIZE, SIZE, generator=g) * 3
    out[:, 0] = torch.arange(views.start, views.stop, dtype=torch.float32)[:, None, None] / 8
    return out


def write_labels(path: Path, spec: LabelsSpec | None = None) -> dict[int, torch.Tensor]:
    writer = LabelsWriter.open(path, spec or labels_spec())
    written = {}
    for shard in writer.pending_shards():
        written[shard] = logits_of(writer.views(shard))
        writer.write_shard(shard, written[shard])
    return written


def label_files(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted((path / "labels").rglob("*")) if f.is_file()
    }


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_labels_round_trip_within_the_codecs_error_and_zarr_reads_the_same_bytes(tmp_path, codec):
    path = tmp_path / "b.zarr"
    write_bank(
        path, BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"}, compressor="blosc-lz4")
    )
    fingerprint = Bank.open(path).fingerprint
    written = torch.cat(list(write_labels(path, labels_spec(codec)).values()))
    bank = Bank.open(path)
    assert bank.fingerprint == fingerprint  # the bank's identity is untouched
    assert bank.labels == labels_spec(codec)
    rows = [19, 0, 7, 8]
    batch = bank.read_rows(rows, labels=True)
    logits = decode_labels({p: torch.from_numpy(a) for p, a in batch["labels"].items()}, "cpu")
    # within the codec's own guaranteed bound (fp16 half an ulp; int8 / int4 half a step)
    from bank.codecs import codec_for

    coder = codec_for(codec, bank.spec)
    payload = coder.encode(written[rows])
    bound = coder.error_bound(written[rows], payload)
    assert torch.all((logits - written[rows]).abs() <= bound + 1e-6)
    # class 0 names the view: the rows came back in the order asked, not the stored order
    if codec == "fp16":
        np.testing.assert_allclose(logits[:, 0, 0, 0].numpy(), np.array(rows) / 8, atol=1e-3)
    # plain zarr-python reads the same stored bytes (crc32c and compressor as in the metadata)
    group = zarr.open_group(path, mode="r")
    for part, direct in batch["labels"].items():
        np.testing.assert_array_equal(direct, group[f"labels/{part}"][rows])
    assert verify_bank(path, progress=False).ok


def test_a_mirrored_bank_stores_each_views_own_labels(tmp_path):
    path = tmp_path / "m.zarr"
    write_bank(path, BankConfig(shard_rows=4, codec="fp16"), flips=1, mirror=True)
    bank = Bank.open(path)
    assert bank.spec.mirror and bank.spec.num_rows == 10
    write_labels(path)
    # view 2*row+flip: the unflipped and the mirrored view of row 5 hold their own (different) logits
    dataset = BankTrainSet(path, labels=True)
    batch = dataset.__getitems__([11, 10, 3])  # row 5 mirrored, row 5, row 1 mirrored
    logits = decode_labels(batch["labels"], "cpu")
    np.testing.assert_allclose(logits[:, 0, 0, 0].numpy(), np.array([11, 10, 3]) / 8, atol=1e-3)
    assert batch["flip"].tolist() == [1, 0, 1]
    assert verify_bank(path, progress=False).ok


def test_kill_minus_9_while_writing_then_resume_gives_identical_bytes(tmp_path):
    reference, killed = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    write_bank(reference)
    write_bank(killed)
    write_labels(reference)
    # the child writes shard 0, then is SIGKILLed in shard 1 after its files and before its marker
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        import bank.labels
        from test_bank_labels import labels_spec, logits_of
        real = bank.labels.write_json
        def marker_then_die(path, data):
            if data.get("shard") == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        bank.labels.write_json = marker_then_die
        writer = bank.labels.LabelsWriter.open({str(killed)!r}, labels_spec())
        for shard in writer.pending_shards():
            writer.write_shard(shard, logits_of(writer.views(shard)))
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    writer = LabelsWriter.open(killed, labels_spec())
    assert writer.pending_shards() == [1, 2]  # shard 1's files are there, unvouched for
    with pytest.raises(BankError, match=r"incomplete \(2 of 3 shards.*re-run `dreamteacher interpret`"):
        Bank.open(killed).require_labels()
    write_labels(killed)
    assert label_files(killed) == label_files(reference)
    assert Bank.open(killed).labels is not None


def test_other_labels_are_refused_unless_overwritten_and_the_bank_never_changes(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    features = {f: f.read_bytes() for f in sorted((path / "features").rglob("*")) if f.is_file()}
    write_labels(path)
    with pytest.raises(BankError) as info:
        LabelsWriter.open(path, labels_spec(sha="b" * 64))
    message = str(info.value)
    assert "\n" not in message and "--overwrite" in message and "interpreter" in message
    writer = LabelsWriter.open(path, labels_spec("int8", sha="b" * 64), overwrite=True)
    assert writer.pending_shards() == [0, 1, 2]  # the old labels' markers went with them
    assert Bank.open(path).labels is None
    write_labels(path, labels_spec("int8", sha="b" * 64))
    bank = Bank.open(path)
    assert bank.labels.codec == "int8" and set(bank.read_rows([0], labels=True)["labels"]) == {
        "q",
        "scale",
        "offset",
    }
    assert {f: f.read_bytes() for f in sorted((path / "features").rglob("*")) if f.is_file()} == features


def test_a_bank_without_labels_says_how_to_make_them(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    with pytest.raises(BankError, match=r"no soft labels: run `dreamteacher interpret`"):
        BankTrainSet(path, labels=True)
    with pytest.raises(BankError, match="no soft labels"):
        Bank.open(path).read_rows([0], labels=True)


def test_a_flipped_byte_in_a_label_chunk_is_an_error_naming_the_labels_repair(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    write_labels(path)
    file = path / "labels/values/c/1/0/0/0"
    data = bytearray(file.read_bytes())
    data[10] ^= 0x40  # inside view 8's chunk (the shard's first)
    file.write_bytes(bytes(data))
    bank = Bank.open(path)  # same size: open passes
    with pytest.raises(BankError) as info:
        bank.read_rows([8], labels=True)
    message = str(info.value)
    for part in ("soft labels of view 8", "crc32c", "labels/done/000001.json", "dreamteacher interpret"):
        assert part in message, (part, message)
    assert bank.read_rows([8])["image"].shape[0] == 1  # the features of that row still read
    report = verify_bank(path, progress=False)
    assert not report.ok and any("soft labels" in p and "shard 1" in p for p in report.problems)


def test_a_truncated_label_file_names_its_shard_and_the_per_shard_repair_works(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    written = write_labels(path)
    before = label_files(path)
    file = path / "labels/values/c/1/0/0/0"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(BankError) as info:
        Bank.open(path)
    message = str(info.value)
    assert "\n" not in message and "soft labels of shard 1" in message and "truncated" in message
    assert "labels/done/000001.json" in message and "dreamteacher interpret" in message
    # the repair it names: withdraw that shard's marker, re-run the writer: only shard 1 is rewritten
    (side_dir(path) / "labels" / "done" / "000001.json").unlink()
    writer = LabelsWriter.open(path, labels_spec())
    assert writer.pending_shards() == [1]
    writer.write_shard(1, written[1])
    assert label_files(path) == before
    assert Bank.open(path).labels == labels_spec()


def test_edited_labels_declaration_and_wrong_shapes_are_errors(tmp_path):
    path = tmp_path / "b.zarr"
    write_bank(path)
    with pytest.raises(BankError, match="do not fit the bank's 16px images"):
        LabelsWriter.open(path, LabelsSpec(num_classes=K, height=8, width=8, stride=4, codec="fp16"))
    writer = LabelsWriter.open(path, labels_spec())
    with pytest.raises(BankError, match=r"expected \(8, 3, 4, 4\)"):
        writer.write_shard(0, torch.zeros(8, K, 2, 2))
    # labels written for one bank's content are not another's: edit the recorded fingerprint
    import json

    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["dreamteacher_labels"]["fingerprint"] = "0" * 64
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(BankError, match="soft labels were written for other bank contents"):
        Bank.open(path)
    assert os.path.isdir(side_dir(path) / "labels" / "done")
