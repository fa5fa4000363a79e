"""The study's instruments through the CLI on the shipped demo teacher: `teacher diagnose`, `distill eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dreamteacher.cli import main
from sources.demo_scenes import scene_for

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(REPO / "pipeline.yaml"), f"teachers.demo.path={REPO / 'assets/demo-teacher'}",
          "teachers.demo.dtype=fp32"]  # fmt: skip


def _scenes(folder: Path, indices: range) -> Path:
    folder.mkdir(parents=True)
    for i in indices:
        Image.fromarray(scene_for("unlabeled", i).image_HW3).save(folder / f"{i:05d}.png")
    return folder


def _ok(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_teacher_diagnose_on_the_demo_teacher(tmp_path: Path) -> None:
    images = _scenes(tmp_path / "scenes", range(6))
    out = tmp_path / "diag.json"
    text = _ok(["teacher", "diagnose", "--images", str(images), "--device", "cpu", "--out", str(out), *CONFIG,
                "encode.data=demo"])  # fmt: skip
    results = json.loads(out.read_text())
    assert sorted(results) == ["s16", "s32", "s4", "s8"] and "| s4 |" in text
    for level in results.values():
        assert all(-1.0 <= v <= 1.0 + 1e-6 for v in level.values())
        assert 0.5 < level["draw_to_draw"] < 0.9999  # a noise-mode read-out is stochastic, at T=50 mildly


@pytest.mark.slow
def test_distill_eval_scores_a_run_on_held_out_images(tmp_path: Path) -> None:
    data = [f"datasets.few={{root: {_scenes(tmp_path / 'bank-images', range(8))}, layout: folder, "
            "teacher: demo, t: 50}", "encode.data=few"]  # fmt: skip
    bank, runs = tmp_path / "bank.zarr", tmp_path / "runs"
    _ok(["encode", "--no-dask", "--quiet", *CONFIG, *data, f"encode.bank={bank}", "encode.draws=1",
         "encode.flips=none", "encode.num_workers=0", "bank.shard_rows=8"])  # fmt: skip
    _ok(["distill", "--no-progress", *CONFIG, *data, f"distill.bank={bank}", f"distill.out={runs}",
         "distill.exp=e", "distill.student.name=resnet10t", "distill.regressor.channels=32", "distill.batch_size=4",
         "distill.num_workers=0", "distill.max_steps=2", "distill.device=cpu"])  # fmt: skip
    held_out = _scenes(tmp_path / "held-out", range(100, 104))
    text = _ok(["distill", "eval", str(runs / "e"), "--images", str(held_out), "--draws", "3", "--device", "cpu",
                *CONFIG])  # fmt: skip
    report = json.loads((runs / "e" / "fidelity.json").read_text())
    assert report["images"] == 4 and report["draws"] == 3 and "held-out fidelity over 4 images" in text
    assert sorted(report["student"]) == ["s16", "s32", "s4", "s8"]
    summary = report["summary"]
    # two training steps reproduce the teacher worse than one of its own draws does
    assert summary["floor_mse"] < summary["mse"] and summary["floor_cos"] > summary["cos"]
