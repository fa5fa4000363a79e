"""encode stage end to end on CPU: tiny random-init UNet2DModel, 32x32 generated images, real bank.

Covers: rows vs a hand-run teacher read-out, rejects and conversions, tap errors, determinism (re-run and dask
LocalCluster vs --no-dask give identical bytes), kill -9 + resume equivalence, config errors, the CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from bank import Bank, BankError
from bank.layout import side_dir
from configlib import ConfigError
from dreamteacher.resolve import resolve
from dreamteacher.schema import PipelineConfig, load_pipeline
from encode.pipeline import run_encode as _run_encode
from encode.worker import clear_caches
from sources.images import list_images, load_image, to_model_range

ROOT = Path(__file__).resolve().parents[1]
NUM_GOOD = 10


def run_encode(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN201 - the tests build whole pipeline configs
    """``run_encode`` on ``resolve(cfg, "encode")``, the inputs the CLI gives it."""
    return _run_encode(resolve(cfg, "encode"), **kwargs)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher (bare UNet folder + scheduler_config.json) and an image folder with every awkward case."""
    from diffusers import DDPMScheduler, UNet2DModel

    tmp = tmp_path_factory.mktemp("encode")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        block_out_channels=(8, 16, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 4,
        up_block_types=("UpBlock2D",) * 4,
        norm_num_groups=4,
    )
    unet.save_pretrained(tmp / "teacher")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp / "teacher")

    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(NUM_GOOD - 2):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(images / f"img{i:02d}.png")
    gray = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(gray).save(images / "gray.png")
    Image.fromarray(rng.integers(0, 256, (34, 34, 3), dtype=np.uint8)).convert("CMYK").save(
        images / "cmyk.jpg"
    )
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / "full.jpg")
    (images / "truncated.jpg").write_bytes((images / "full.jpg").read_bytes()[:300])
    (images / "full.jpg").unlink()
    (images / "notes.jpg").write_text("a text file named .jpg")
    return tmp


def overrides(assets: Path, bank: Path, *extra: str) -> list[str]:
    return [
        f"datasets.tiny={{root: {assets / 'images'}, layout: folder, teacher: tiny, t: 50}}",
        f"teachers.tiny={{kind: diffusers, path: {assets / 'teacher'}, dtype: fp32}}",
        "encode.data=tiny",
        f"encode.bank={bank}",
        "encode.num_workers=0",
        "encode.batch_size=8",
        "encode.cpu_threads=1",
        "bank.shard_rows=8",
        # the layout these tests were written for (the defaults before the cache-cost study)
        "encode.draws=2",
        "encode.store=draws",
        "bank.codec=int8",
        "bank.pixels=rows",
        "bank.pixel_compressor=none",
        *extra,
    ]


def make_cfg(assets: Path, bank: Path, *extra: str) -> PipelineConfig:
    return load_pipeline(ROOT / "pipeline.yaml", overrides(assets, bank, *extra))


def array_files(bank: Path) -> dict[str, bytes]:
    """Every data file and done marker of a bank (not the root attributes: they hold a creation time)."""
    files = {str(p.relative_to(bank)): p.read_bytes() for p in sorted(bank.rglob("*")) if p.is_file()}
    files.pop("zarr.json")
    # a marker names its bank's random bank_id; everything else in it is a function of the shard's bytes
    markers = {
        f"done/{p.name}": {k: v for k, v in json.loads(p.read_text()).items() if k != "bank_id"}
        for p in sorted((side_dir(bank) / "done").glob("*.json"))
    }
    assert markers, f"{bank} has no done markers"
    return {**files, **markers}


@pytest.fixture(scope="module")
def reference_bank(assets: Path) -> Path:
    bank = assets / "reference.zarr"
    clear_caches()
    run_encode(make_cfg(assets, bank), use_dask=False, progress=False)
    return bank


def test_rows_match_a_hand_run_readout(assets: Path, reference_bank: Path) -> None:
    from teachers import build_teacher
    from teachers.encoding import TeacherEncoder, make_noise, row_seed

    group = zarr.open_group(reference_bank, mode="r")
    keys = [bytes(k).rstrip(b"\0").decode() for k in group["key"][:]]
    records = list_images("tiny", make_cfg(assets, reference_bank).datasets["tiny"])
    assert len(keys) == len(records) * 4 and keys[::4] == [r.key for r in records]
    np.testing.assert_array_equal(group["draw"][:8], [0, 0, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(group["flip"][:8], [0, 1, 0, 1, 0, 1, 0, 1])

    # rejects: both broken files, rows zero and not ok; grayscale and CMYK are converted and encoded
    ok = group["ok"][:]
    summary = json.loads((side_dir(reference_bank) / "summary.json").read_text())
    assert set(summary["rejects"]) == {"notes.jpg", "truncated.jpg"}
    assert summary["rejects"]["notes.jpg"].startswith("UnidentifiedImageError")
    for i, key in enumerate(keys):
        assert ok[i] == (key not in summary["rejects"])
    bad = keys.index("notes.jpg")
    assert not group["image"][bad].any()

    # one row recomputed by hand: image index 2, draw 1, flip 1
    cfg = make_cfg(assets, reference_bank)
    teacher = build_teacher(cfg.teachers["tiny"], "cpu")
    encoder = TeacherEncoder(
        teacher, teacher.default_taps(), mode="noise", t=50, ddim_steps=1, resolution=32, device="cpu",
        dtype_name="fp32", channels_last=False,
    )  # fmt: skip
    row = 2 * 4 + 1 * 2 + 1
    image_u8 = load_image(records[2], 32)[0][:, :, ::-1].copy()
    np.testing.assert_array_equal(group["image"][row], image_u8)
    seed = row_seed(0, records[2].key, 1)
    assert group["seed"][row] == seed
    eps = make_noise([seed], [True], (3, 32, 32))
    expected = encoder(to_model_range(torch.from_numpy(image_u8))[None], eps)
    for level, feats in expected.items():
        q = group[f"features/{level}/q"][row].astype(np.float32)
        scale = group[f"features/{level}/scale"][row].astype(np.float32)
        offset = group[f"features/{level}/offset"][row].astype(np.float32)
        decoded = q * scale.reshape(-1, 1, 1) + offset.reshape(-1, 1, 1)
        ref = feats[0].numpy()
        span = ref.max(axis=(1, 2), keepdims=True) - ref.min(axis=(1, 2), keepdims=True)
        assert np.all(np.abs(decoded - ref) <= span / 254 + 1e-2 * span + 1e-6), level

    # resolved config beside the bank names the derived values
    resolved = (side_dir(reference_bank) / "config.yaml").read_text()
    assert "teacher: tiny" in resolved and "t: 50" in resolved and "resolution: 32" in resolved


def test_rerun_and_dask_give_identical_bytes(assets: Path, reference_bank: Path) -> None:
    clear_caches()
    again = assets / "again.zarr"
    run_encode(make_cfg(assets, again, "encode.num_workers=2"), use_dask=False, progress=False)
    assert array_files(again) == array_files(reference_bank)
    with_dask = assets / "dask.zarr"
    summary = run_encode(make_cfg(assets, with_dask), use_dask=True, progress=False)
    assert summary.shards_encoded == summary.shards_total
    assert array_files(with_dask) == array_files(reference_bank)
    # a re-run of a finished bank does nothing
    clear_caches()
    summary = run_encode(make_cfg(assets, again), use_dask=False, progress=False)
    assert summary.shards_encoded == 0 and set(summary.rejects) == {"notes.jpg", "truncated.jpg"}


def test_kill_minus_9_then_resume_equals_uninterrupted(assets: Path) -> None:
    # one image per shard, so the kill lands between (or inside) shard writes of a still-running encode
    extra = ("bank.shard_rows=4", "encode.tasks_per_worker=1")
    reference = assets / "ref4.zarr"
    clear_caches()
    run_encode(make_cfg(assets, reference, *extra), use_dask=False, progress=False)

    bank = assets / "killed.zarr"
    cmd = [sys.executable, "-m", "dreamteacher", "encode", "--config", str(ROOT / "pipeline.yaml"), "--no-dask",
           "--quiet", *overrides(assets, bank, *extra)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not list((side_dir(bank) / "done").glob("*.json")) if (side_dir(bank) / "done").is_dir() else True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"encode ended or stalled before any shard was done: {proc.stderr.read()!r}")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((side_dir(bank) / "done").glob("*.json")))
    total = len(list((side_dir(reference) / "done").glob("*.json")))
    assert 1 <= done_at_kill < total, "the run finished before the kill: nothing was resumed"

    clear_caches()
    summary = run_encode(make_cfg(assets, bank, *extra), use_dask=False, progress=False)
    assert summary.shards_encoded == total - done_at_kill
    assert array_files(bank) == array_files(reference)


def test_ddim_mode_encodes_deterministically_without_noise(assets: Path, reference_bank: Path) -> None:
    clear_caches()
    extra = (
        "encode.mode=ddim",
        "encode.ddim_steps=2",
        "encode.draws=1",
        "encode.flips=none",
        "bank.shard_rows=4",
    )
    first, second = assets / "ddim1.zarr", assets / "ddim2.zarr"
    run_encode(make_cfg(assets, first, *extra), use_dask=False, progress=False)
    run_encode(make_cfg(assets, second, *extra, "encode.seed=7"), use_dask=False, progress=False)
    group = zarr.open_group(first, mode="r")
    assert group["ok"][:].sum() == NUM_GOOD and group["features/s8/q"][:].any()
    # the seed only drives the noise: ddim features do not depend on it
    for level in ("s4", "s8"):
        np.testing.assert_array_equal(
            group[f"features/{level}/q"][:], zarr.open_group(second, mode="r")[f"features/{level}/q"][:]
        )


def test_tap_errors_name_the_problem(assets: Path) -> None:
    clear_caches()
    cfg = make_cfg(assets, assets / "taps.zarr", "teachers.tiny.taps=[{module: up_blocks.9, stride: 8}]")
    with pytest.raises(ValueError, match=r"do not exist[\s\S]*up_blocks\.0\.upsamplers\.0"):
        run_encode(cfg, use_dask=False, progress=False)
    cfg = make_cfg(assets, assets / "taps.zarr", "teachers.tiny.taps=[{module: up_blocks.0, stride: 5}]")
    with pytest.raises(ValueError, match="stride 5 does not divide the image size 32"):
        run_encode(cfg, use_dask=False, progress=False)
    assert not (assets / "taps.zarr").exists()  # validated before the bank was created


def test_config_errors(assets: Path, reference_bank: Path) -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'nope'; datasets in the config: .*tiny"):
        run_encode(make_cfg(assets, reference_bank, "encode.data=nope"), use_dask=False, progress=False)
    with pytest.raises(ConfigError, match="unknown teacher 'nope'; teachers in the config: .*tiny"):
        run_encode(make_cfg(assets, reference_bank, "encode.teacher=nope"), use_dask=False, progress=False)
    clear_caches()
    with pytest.raises(BankError, match=r"encoding\.t: 50 -> 60[\s\S]*--overwrite"):
        run_encode(make_cfg(assets, reference_bank, "encode.t=60"), use_dask=False, progress=False)
    # where the weights live is not a setting: the same weights at another path resume the same bank
    moved = assets / "teacher-moved"
    shutil.copytree(assets / "teacher", moved)
    summary = run_encode(
        make_cfg(assets, reference_bank, f"teachers.tiny.path={moved}"), use_dask=False, progress=False
    )
    assert summary.shards_encoded == 0


def test_cli_help_and_missing_imagenet_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamteacher.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["encode", "--help"])
    assert result.exit_code == 0
    for flag in ("--overwrite", "--scheduler", "--no-dask", "--config", "KEY.PATH=VALUE"):
        assert flag in result.output
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    monkeypatch.chdir(ROOT)
    result = runner.invoke(main, ["encode", "encode.data=imagenet"])
    assert result.exit_code != 0 and "IMAGENET_ROOT" in result.output


def test_a_long_path_gets_a_short_key_and_its_full_path_is_kept(assets: Path, tmp_path: Path) -> None:
    deep = tmp_path / "images" / ("a-very-long-folder-name-" * 4) / ("and-another-" * 4)
    deep.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(deep / "photo.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / "short.png")
    bank = tmp_path / "long.zarr"
    cfg = load_pipeline(
        ROOT / "pipeline.yaml",
        [*overrides(assets, bank, "encode.draws=1", "encode.flips=none", "bank.shard_rows=1"),
         f"datasets.tiny.root={tmp_path / 'images'}"],
    )  # fmt: skip
    run_encode(cfg, use_dask=False, progress=False)
    full = str((deep / "photo.png").relative_to(tmp_path / "images"))
    assert len(full.encode()) > 64
    keys = Bank.open(bank).keys(slice(None))
    short = next(k for k in keys if k != "short.png")
    assert len(short.encode()) <= 64 and short.startswith(full[:20]) and "~" in short
    summary = json.loads((side_dir(bank) / "summary.json").read_text())
    assert summary["long_keys"] == {short: full}
