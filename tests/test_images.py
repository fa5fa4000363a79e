"""Image sources: layouts, stable keys/order, preprocessing, conversions, rejects, the DataLoader."""

from __future__ import annotations

import hashlib
import inspect
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
    MAX_KEY_BYTES,
    DecodePool,
    ImageRecord,
    center_crop_resize,
    decode_rgb,
    keys_sha256,
    list_images,
    load_image,
    storable_key,
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


# ---- every mode against a hand-made reference -------------------------------------------------------------
# 16-bit values chosen around the rounding points of v / 257 (128.5 -> 0/1, 385.5 -> 1/2) and at both ends.
GREY16 = np.array([[0, 128, 129, 385, 386, 300], [32896, 40000, 65407, 65408, 65534, 65535]], np.uint16)


def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _grey_rgb(grey_u8: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey_u8, np.uint8)[..., None], 3, axis=2)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference alpha compositing in floats: c * a + 255 * (1 - a), rounded."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(colour.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


GREY16_U8 = _grey_rgb([[round(int(v) / 257) for v in row] for row in GREY16])


@pytest.mark.parametrize(
    ("fmt", "array"),
    [("PNG", GREY16), ("TIFF", GREY16), ("TIFF", GREY16.astype(">u2"))],
    ids=["I;16-png", "I;16-tiff", "I;16B-tiff"],
)
def test_16_bit_grey_is_scaled_not_clipped(fmt: str, array: np.ndarray) -> None:
    image = Image.open(io.BytesIO(_saved(Image.fromarray(array), fmt)))
    assert image.mode in ("I;16", "I;16B", "I")  # Pillow 10.0 opens a 16-bit grey PNG as I, 13 as I;16
    np.testing.assert_array_equal(np.asarray(decode_rgb(_saved(Image.fromarray(array), fmt))), GREY16_U8)


def test_16_bit_png_is_not_stored_white(tmp_path: Path) -> None:
    # the reported defect: a 16-bit grey PNG of mid-grey came out as 255 everywhere with ok=True
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(path)
    image_u8, reason = load_image(ImageRecord("k", str(path)), 8)
    assert reason == "" and image_u8.shape == (3, 8, 8)
    assert (image_u8 == 128).all()


def test_mode_i_is_16_bit_range_and_out_of_range_values_are_rejects(tmp_path: Path) -> None:
    # PIL opens 16-bit PGM (and 16-bit PNG in older Pillow) as mode I, scaled to 0..65535
    pgm = b"P5 6 2 65535\n" + GREY16.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    np.testing.assert_array_equal(np.asarray(decode_rgb(pgm)), GREY16_U8)
    in_range = _saved(Image.fromarray(GREY16.astype(np.int32)), "TIFF")
    np.testing.assert_array_equal(np.asarray(decode_rgb(in_range)), GREY16_U8)
    for bad in (70000, -1):
        path = tmp_path / f"i32-{bad}.tiff"
        Image.fromarray(np.array([[0, bad]], np.int32)).save(path)
        image_u8, reason = load_image(ImageRecord("k", str(path)), 2)
        assert image_u8 is None and "mode I" in reason and "0..65535" in reason, reason


def test_float_images_are_rejects(tmp_path: Path) -> None:
    path = tmp_path / "f.tiff"
    Image.fromarray(np.array([[0.25, 0.75]], np.float32)).save(path)
    image_u8, reason = load_image(ImageRecord("k", str(path)), 2)
    assert image_u8 is None and reason.startswith("UnsupportedImage") and "mode F" in reason


def test_rgba_and_la_are_composited_on_white() -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    alpha[0, :3] = [0, 255, 128]
    colour[0, 0] = 0  # a fully transparent black pixel: white, not black
    rgba = Image.fromarray(np.dstack([colour, alpha]), "RGBA")
    out = np.asarray(decode_rgb(_saved(rgba, "PNG")))
    np.testing.assert_array_equal(out, _over_white(colour, alpha))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == colour[0, 1].tolist()
    grey = colour[..., 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    np.testing.assert_array_equal(
        np.asarray(decode_rgb(_saved(la, "PNG"))), _over_white(_grey_rgb(grey), alpha)
    )


def test_palette_with_transparency_is_composited_and_without_it_is_the_palette_colour() -> None:
    palette = [10, 20, 30, 200, 100, 50, 0, 0, 0] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    colours = np.array(palette[:9], np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(np.asarray(decode_rgb(_saved(image, "PNG"))), colours[indices])
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=2)  # index 2 (black) is transparent
    expected = colours[indices].copy()
    expected[indices == 2] = 255
    np.testing.assert_array_equal(np.asarray(decode_rgb(buf.getvalue())), expected)


def test_cmyk_bilevel_grey_and_rgb_match_hand_references() -> None:
    rng = np.random.default_rng(1)
    cmyk = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = np.round((255 - c) * (255 - k) / 255).astype(np.uint8)
    np.testing.assert_array_equal(
        np.asarray(decode_rgb(_saved(Image.fromarray(cmyk, "CMYK"), "TIFF"))), expected
    )
    bits = rng.integers(0, 2, (3, 5)).astype(bool)
    np.testing.assert_array_equal(
        np.asarray(decode_rgb(_saved(Image.fromarray(bits).convert("1"), "PNG"))), _grey_rgb(bits * 255)
    )
    grey = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    np.testing.assert_array_equal(
        np.asarray(decode_rgb(_saved(Image.fromarray(grey), "PNG"))), _grey_rgb(grey)
    )
    rgb = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(decode_rgb(_saved(Image.fromarray(rgb), "PNG"))), rgb)


# ---- keys the bank can store --------------------------------------------------------------------------------
def test_key_limit_is_the_bank_key_field() -> None:
    from bank.spec import KEY_BYTES

    assert MAX_KEY_BYTES == KEY_BYTES
    assert inspect.signature(list_images).parameters["max_key_bytes"].default == KEY_BYTES


def test_long_paths_get_short_deterministic_keys_and_keep_the_full_path(tmp_path: Path) -> None:
    from bank.writer import decode_keys, encode_keys

    long_rel = f"{'n' * 40}/{'x' * 60}.png"
    utf8_rel = f"{'é' * 30}/photo.png"  # 2-byte characters: the cut must not split one
    for rel in [long_rel, utf8_rel, "short.png"]:
        _png(tmp_path / rel)
    records = list_images("d", DatasetConfig(root=str(tmp_path), layout="folder"))
    by_full = {r.full_key: r for r in records}
    assert sorted(by_full) == sorted([long_rel, utf8_rel, "short.png"])
    assert by_full["short.png"].key == "short.png"
    for rel in (long_rel, utf8_rel):
        key = by_full[rel].key
        digest = hashlib.sha256(rel.encode()).hexdigest()[:16]
        assert key.endswith("~" + digest) and rel.startswith(key[: -len(digest) - 1])
        assert len(key.encode()) <= 64 and len(key.encode()) >= 63
        assert load_image(by_full[rel], 8)[0] is not None  # the record still reads the real file
    # every listed key is storable, and comes back as written
    keys = [r.key for r in records]
    assert decode_keys(encode_keys(keys)) == keys
    # deterministic: a second listing gives the same keys
    assert [r.key for r in list_images("d", DatasetConfig(root=str(tmp_path), layout="folder"))] == keys
    assert storable_key("a" * 64) == "a" * 64 and storable_key("a" * 65) != "a" * 65


def test_a_shortened_key_equal_to_a_real_key_is_an_error(tmp_path: Path) -> None:
    long_rel = "d/" + "y" * 80 + ".png"
    clash = storable_key(long_rel)
    list_file = tmp_path / "files.txt"
    list_file.write_text(f"{long_rel}\n{clash}\n")
    with pytest.raises(ConfigError, match="both get the bank key"):
        list_images("l", DatasetConfig(root=str(list_file), layout="list"))


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
