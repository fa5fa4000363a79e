"""A bank written with each compact codec encodes, verifies and distils at debug size (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from bank import Bank
from dreamteacher.cli import main
from sources.demo_scenes import scene_for

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(REPO / "pipeline.yaml"), f"teachers.demo.path={REPO / 'assets/demo-teacher'}",
          "teachers.demo.dtype=fp32"]  # fmt: skip


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("codec", "extra"), [("int4", ["bank.int4_group=4"]), ("fp8", [])])
def test_compact_codec_bank_encodes_verifies_and_distils(
    tmp_path: Path, codec: str, extra: list[str]
) -> None:
    (tmp_path / "scenes").mkdir()
    for i in range(8):
        Image.fromarray(scene_for("unlabeled", i).image_HW3).save(tmp_path / "scenes" / f"{i}.png")
    data = [
        f"datasets.few={{root: {tmp_path / 'scenes'}, layout: folder, teacher: demo, t: 50}}",
        "encode.data=few",
    ]
    bank = tmp_path / "bank.zarr"
    _ok(["encode", "--no-dask", "--quiet", *CONFIG, *data, f"encode.bank={bank}", "encode.draws=1",
         "encode.flips=none", "encode.num_workers=0", "bank.shard_rows=8", f"bank.codec={codec}", *extra])  # fmt: skip
    opened = Bank.open(bank)
    assert {lv.codec for lv in opened.levels} == {codec}
    assert opened.spec.to_dict().get("int4_group") == (4 if codec == "int4" else None)
    _ok(["bank", "verify", str(bank)])
    runs = tmp_path / "runs"
    _ok(["distill", "--no-progress", *CONFIG, *data, f"distill.bank={bank}", f"distill.out={runs}", "distill.exp=e",
         "distill.student.name=resnet10t", "distill.regressor.channels=32", "distill.batch_size=4",
         "distill.num_workers=0", "distill.max_steps=2", "distill.log_every=1", "distill.device=cpu"])  # fmt: skip
    records = [json.loads(line) for line in (runs / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
