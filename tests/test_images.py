"""Image sources: layouts, stable keys/order, preprocessing, conversions, rejects, the DataLoader."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configlib import ConfigError
from sources.datasets import DatasetConfig
from sources.images import (
    DecodePool,
    ImageRecord,
    center_crop_resize,
    keys_sha256,
    list_images,
    load_image,
    to_model_range,
)


def _png(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_folder_layout_recursive_sorted_and_limited(tmp_path: Path) -> None:
    for rel in ["b/2.png", "a/1.png", "a/sub/0.PNG", "c.jpg"]:
        _png(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image extension: not listed")
    records = list_images("d", DatasetConfig(root=str(tmp_path), layout="folder"))
    assert [r.key for r in records] == ["a/1.png", "a/sub/0.PNG", "b/2.png", "c.jpg"]
    limited = list_images("d", DatasetConfig(root=str(tmp_path), layout="folder", limit=2))
    assert [r.key for r in limited] == ["a/1.png", "a/sub/0.PNG"]
    assert keys_sha256([r.key for r in limited]) != keys_sha256([r.key for r in records])


def test_imagefolder_list_and_wds_layouts(tmp_path: Path) -> None:
    for rel in ["train/n02/x.JPEG", "train/n01/y.JPEG", "val/n01/z.JPEG"]:
        _png(tmp_path / "in" / rel)
    records = list_images("in", DatasetConfig(root=str(tmp_path / "in"), layout="imagefolder", split="train"))
    assert [r.key for r in records] == ["n01/y.JPEG", "n02/x.JPEG"]

    list_file = tmp_path / "in" / "files.txt"
    list_file.write_text("# comment\ntrain/n02/x.JPEG\n\nval/n01/z.JPEG\n")
    records = list_images("l", DatasetConfig(root=str(list_file), layout="list"))
    assert [r.key for r in records] == ["train/n02/x.JPEG", "val/n01/z.JPEG"]
    assert load_image(records[0], 8)[0] is not None

    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (9, 9), (shard * 100, i * 100, 7)).save(buf, format="PNG")
                for name, data in [(f"{shard}{i}.png", buf.getvalue()), (f"{shard}{i}.cls", b"3")]:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pattern = str(tmp_path / "shard-{0..1}.tar")
    records = list_images("w", DatasetConfig(root=pattern, layout="wds"))
    assert [r.key for r in records] == ["shard-0.tar/00.png", "shard-0.tar/01.png", "shard-1.tar/10.png",
                                        "shard-1.tar/11.png"]  # fmt: skip
    image_u8, reason = load_image(records[3], 9)
    assert reason == "" and image_u8[:, 4, 4].tolist() == [100, 100, 7]


def test_unknown_layout_and_missing_root_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an image layout; choices: folder, imagefolder, list, wds"):
        list_images("seg", DatasetConfig(root=str(tmp_path), layout="ade20k"))
    with pytest.raises(ConfigError, match="does not exist"):
        list_images("x", DatasetConfig(root=str(tmp_path / "absent"), layout="folder"))
    with pytest.raises(ConfigError, match="IMAGENET_ROOT"):
        list_images("imagenet", DatasetConfig(root="${IMAGENET_ROOT}", layout="imagefolder"))
    with pytest.raises(ConfigError, match="root is empty"):
        list_images("imagenet", DatasetConfig(root="", layout="imagefolder"))
    with pytest.raises(ConfigError, match="contains no images"):
        list_images("e", DatasetConfig(root=str(tmp_path), layout="folder"))


def test_center_crop_matches_hand_computed_crop() -> None:
    arr_HWC = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    # shorter side already 20: no resize, crop columns 10..29
    out = center_crop_resize(Image.fromarray(arr_HWC), 20)
    np.testing.assert_array_equal(out, arr_HWC[:, 10:30].transpose(2, 0, 1))
    # 80x40 -> box-halved to 40x20 (2x2 means) then cropped
    big = np.repeat(np.repeat(arr_HWC, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(center_crop_resize(Image.fromarray(big), 20), out)
    # upscaling: portrait 10x30 -> 16x48 (bicubic), crop rows 16..31
    tall = center_crop_resize(Image.fromarray(arr_HWC[:15, :5]), 16)
    assert tall.shape == (3, 16, 16) and tall.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_non_rgb_modes_are_converted(tmp_path: Path, mode: str) -> None:
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    path = tmp_path / f"img.{ext}"
    if mode == "I;16":
        Image.fromarray(np.full((10, 12), 300, np.uint16)).save(path)
    else:
        _png(path, mode=mode)
    image_u8, reason = load_image(ImageRecord("k", str(path)), 8)
    assert reason == "" and image_u8.shape == (3, 8, 8) and image_u8.dtype == np.uint8
    if mode == "L":
        assert (image_u8[0] == image_u8[1]).all() and (image_u8[1] == image_u8[2]).all()


def test_corrupt_files_are_rejects_with_reasons(tmp_path: Path) -> None:
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg")
    jpeg = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    image_u8, reason = load_image(ImageRecord("t", str(text)), 8)
    assert image_u8 is None and reason.startswith("UnidentifiedImageError")
    image_u8, reason = load_image(ImageRecord("t", str(truncated)), 8)
    assert image_u8 is None and "truncated" in reason
    image_u8, reason = load_image(ImageRecord("t", str(tmp_path / "gone.png")), 8)
    assert image_u8 is None and reason.startswith("FileNotFoundError")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_decode_pool_keeps_order_and_flags_rejects(tmp_path: Path, num_workers: int) -> None:
    records = [ImageRecord(f"{i}", str(_png(tmp_path / f"{i}.png", value=i))) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    records.insert(2, ImageRecord("bad", str(tmp_path / "bad.png")))
    pool = DecodePool(num_workers, prefetch_factor=1)
    try:
        for _ in range(2):  # the same workers serve a second record list
            batches = list(pool.batches(records, 8, batch_size=4))
            assert torch.cat([b["index"] for b in batches]).tolist() == list(range(6))
            assert [k for b in batches for k in b["key"]] == [r.key for r in records]
            ok = torch.cat([b["ok"] for b in batches])
            assert ok.tolist() == [True, True, False, True, True, True]
            assert batches[0]["reason"][2] and batches[0]["image_u8"][2].sum() == 0
            expected = load_image(records[3], 8)[0]
            np.testing.assert_array_equal(batches[0]["image_u8"][3].numpy(), expected)
            assert (
                batches[1]["image_u8"].shape == (2, 3, 8, 8) and batches[1]["image_u8"].dtype == torch.uint8
            )
        # a consumer that stops early leaves the pool usable
        next(iter(pool.batches(records, 8, batch_size=1)))
        assert len(list(pool.batches(records[:3], 8, batch_size=2))) == 2
    finally:
        pool.close()


def test_to_model_range() -> None:
    x = to_model_range(torch.tensor([0, 255, 127], dtype=torch.uint8))
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
