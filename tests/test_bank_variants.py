"""The cache-cost study's bank variants (issue 12) and the compact layout's pixels once per image (issue 13),
each against an independent reference: mean-of-K rows against the K single-draw rows of another bank, mirrored
flips against ``torch.flip`` of the stored row, pixels once against the pixels stored in every row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bank import Bank, BankTrainSet, EpochSampler, decode_targets
from bank.layout import array_defs
from dreamteacher.cli import main
from sources.demo_scenes import scene_for
from teachers.encoding import row_seed

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(REPO / "pipeline.yaml"), f"teachers.demo.path={REPO / 'assets/demo-teacher'}",
          "teachers.demo.dtype=fp32"]  # fmt: skip
IMAGES = 6


def _run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("variants")
    (root / "scenes").mkdir()
    for i in range(IMAGES):
        Image.fromarray(scene_for("unlabeled", i).image_HW3).save(root / "scenes" / f"{i}.png")
    data = [
        f"datasets.few={{root: {root / 'scenes'}, layout: folder, teacher: demo, t: 50}}",
        "encode.data=few",
    ]
    return root, data


def _encode(scenes: tuple[Path, list[str]], name: str, *settings: str) -> Bank:
    root, data = scenes
    bank = root / f"{name}.zarr"
    if not bank.exists():
        _run(["encode", "--no-dask", "--quiet", *CONFIG, *data, f"encode.bank={bank}", "encode.num_workers=0",
              "bank.shard_rows=12", "encode.store=draws", "bank.codec=int8", "bank.pixels=rows",
              "bank.pixel_compressor=none", *settings])  # fmt: skip
    return Bank.open(bank)


def test_a_mean_of_k_row_is_the_mean_of_the_k_single_draw_rows(scenes) -> None:
    draws = _encode(scenes, "k3", "encode.draws=3", "encode.flips=both", "bank.codec=fp16")
    means = _encode(
        scenes, "mean3", "encode.draws=3", "encode.store=mean", "encode.flips=both", "bank.codec=fp16"
    )
    spec = means.spec
    assert (spec.draws, spec.flips, spec.mean_of, spec.num_rows) == (1, 2, 3, IMAGES * 2)
    assert spec.format_version() == 3 and means.attrs["format_version"] == 3
    assert draws.spec.format_version() == 2  # a bank without the new options keeps the v2 format
    single = draws.decode_rows(slice(None))
    mean = means.decode_rows(slice(None))
    for level, values in single.items():
        # draws bank rows: (image, draw, flip); the mean over the draw axis is the means bank's (image, flip) row
        by_draw = values.reshape(IMAGES, 3, 2, *values.shape[1:])
        expected = by_draw.astype(np.float64).mean(axis=1).reshape(IMAGES * 2, *values.shape[1:])
        scale = np.abs(expected).max()
        # both banks are fp16: each side is off by at most 2^-11 relative; batches differ in composition
        np.testing.assert_allclose(mean[level], expected, rtol=2e-3, atol=2e-3 * scale)
        assert not np.allclose(
            mean[level], values.reshape(by_draw.shape)[:, 0].reshape(expected.shape), atol=1e-3
        )
    # a row of means records its first draw's seed; its pixels are the view's (the flipped row's mirrored)
    keys = means.keys(slice(None))
    assert means.row_meta["seed"].tolist() == [row_seed(0, k, 0) for k in keys]
    rows = means.read_rows(slice(None))
    np.testing.assert_array_equal(rows["image"][1::2], rows["image"][0::2][..., ::-1])


def test_replay_of_a_bank_of_means_is_refused_in_one_line(scenes, tmp_path) -> None:
    means = _encode(
        scenes, "mean3", "encode.draws=3", "encode.store=mean", "encode.flips=both", "bank.codec=fp16"
    )
    result = CliRunner().invoke(main, ["distill", "--no-progress", *CONFIG, *scenes[1], f"distill.bank={means.path}",
                                       f"distill.out={tmp_path}", "distill.targets=replay", "distill.device=cpu",
                                       "distill.batch_size=4", "distill.num_workers=0"])  # fmt: skip
    assert result.exit_code != 0 and "holds means of 3 draws" in result.output
    assert "Traceback" not in result.output


def test_a_mirrored_flip_view_is_torch_flip_of_the_stored_row(scenes) -> None:
    mirrored = _encode(scenes, "mirror", "encode.draws=1", "encode.flips=mirror", "bank.codec=int4")
    both = _encode(scenes, "both", "encode.draws=1", "encode.flips=both", "bank.codec=int4")
    spec = mirrored.spec
    assert (spec.flips, spec.mirror, spec.read_flips, spec.num_rows) == (1, True, 2, IMAGES)
    dataset = BankTrainSet(mirrored.path)
    assert len(dataset) == 2 * IMAGES
    batch = dataset.__getitems__([4, 5, 0, 11])  # views: (row 2, flip 0), (row 2, flip 1), (0, 0), (5, 1)
    assert batch["row"].tolist() == [2, 2, 0, 5] and batch["flip"].tolist() == [0, 1, 0, 1]
    assert batch["mirror"].tolist() == [False, True, False, True]
    feats = decode_targets(batch["targets"], "cpu", mirror=batch["mirror"])
    stored = decode_targets(batch["targets"], "cpu")
    for level, values in feats.items():
        torch.testing.assert_close(values[1], torch.flip(stored[level][1], [-1]), rtol=0, atol=0)
        torch.testing.assert_close(values[0], stored[level][0], rtol=0, atol=0)
        torch.testing.assert_close(values[0], values[1].flip(-1), rtol=0, atol=0)
    assert torch.equal(batch["image"][1], batch["image"][0].flip(-1))
    # the stored row is the unflipped view of a full-flip bank of the same settings (same seed, same pixels)
    full = both.read_rows([4])  # image 2, flip 0
    np.testing.assert_array_equal(batch["image"][0].numpy(), full["image"][0])
    assert int(batch["seed"][0]) == int(full["seed"][0])
    # every epoch serves each image once, as either view; over epochs both views appear
    sampler = EpochSampler(mirrored, 3, seed=1)
    seen = set()
    for epoch in range(6):
        views = sampler.epoch_rows(epoch)
        assert sorted(v // 2 for v in views) == list(range(IMAGES))
        seen |= set(views.tolist())
    assert seen == set(range(2 * IMAGES))


def test_pixels_once_per_image_read_back_as_every_rows_view(scenes) -> None:
    per_row = _encode(scenes, "px-rows", "encode.draws=2", "encode.flips=both")
    once = _encode(scenes, "px-once", "encode.draws=2", "encode.flips=both", "bank.pixels=image",
                   "bank.pixel_compressor=zstd")  # fmt: skip
    image_def = next(d for d in array_defs(once.spec) if d.path == "image")
    assert image_def.per_image and image_def.length(once.spec) == IMAGES
    a, b = per_row.read_rows(slice(None)), once.read_rows(slice(None))
    np.testing.assert_array_equal(a["image"], b["image"])
    for level in a["targets"]:
        for part in a["targets"][level]:
            np.testing.assert_array_equal(a["targets"][level][part], b["targets"][level][part])

    def pixel_bytes(bank: Bank) -> int:
        return sum(
            f.stat().st_size
            for f in (bank.path / "image").rglob("*")
            if f.is_file() and f.name != "zarr.json"
        )

    assert pixel_bytes(once) < pixel_bytes(per_row) / 4  # 1/4 of the rows, then zstd
    _run(["bank", "verify", "--no-progress", str(once.path)])  # the direct reader agrees with zarr-python


def test_a_compact_bank_distils_from_the_bank_and_online(scenes, tmp_path) -> None:
    bank = _encode(scenes, "compact", "encode.draws=2", "encode.store=mean", "encode.flips=mirror",
                   "bank.pixels=image", "bank.codec=int4")  # fmt: skip
    assert bank.spec.num_rows == IMAGES
    for targets in ("bank", "online"):
        _run(["distill", "--no-progress", *CONFIG, *scenes[1], f"distill.bank={bank.path}", f"distill.out={tmp_path}",
              f"distill.exp={targets}", f"distill.targets={targets}", "distill.student.name=resnet10t",
              "distill.regressor.channels=32", "distill.batch_size=4", "distill.num_workers=0",
              "distill.max_steps=2", "distill.log_every=1", "distill.device=cpu"])  # fmt: skip
        records = [
            json.loads(line) for line in (tmp_path / targets / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)


def test_compressed_pixels_need_pixels_once_per_image(scenes, tmp_path) -> None:
    result = CliRunner().invoke(main, ["encode", "--no-dask", *CONFIG, *scenes[1], f"encode.bank={tmp_path / 'x'}",
                                       "bank.pixels=rows", "bank.pixel_compressor=zstd"])  # fmt: skip
    assert (
        result.exit_code != 0
        and "set bank.pixels=image" in result.output
        and "Traceback" not in result.output
    )


def test_banks_that_differ_only_in_their_views_visit_images_in_the_same_order() -> None:
    """The study pairs its variants by seed: K draws, means and mirrored flips must not change the data order
    (at the same images per shard: the block shuffle permutes shards)."""
    from bank.spec import BankSpec, LevelSpec

    def spec(**kw) -> BankSpec:
        level = LevelSpec(name="s8", stride=8, channels=2, height=2, width=2, codec="fp16")
        rows = 4 * kw["draws"] * kw["flips"]
        return BankSpec(levels=[level], num_images=40, shard_rows=rows, image_size=16, **kw)

    orders = []
    for kw in ({"draws": 1, "flips": 2}, {"draws": 8, "flips": 2}, {"draws": 1, "flips": 1, "mirror": True},
               {"draws": 1, "flips": 2, "mean_of": 8}, {"draws": 4, "flips": 1}):  # fmt: skip
        s = spec(**kw)
        views = EpochSampler(s, 4, seed=3).epoch_rows(2)
        per_image = s.views_per_image * (2 if s.mirror else 1)
        orders.append((views // per_image).tolist())
    assert all(order == orders[0] for order in orders) and sorted(orders[0]) == list(range(40))
