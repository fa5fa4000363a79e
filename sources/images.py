"""Image sources shared by encode, teacher training and online distillation.

Four layouts (``DatasetConfig.layout``), each listed into :class:`ImageRecord` s with a stable key (the image's
path relative to the dataset root) in a deterministic sorted order:

* ``imagefolder``: ``<root>/<split>/<class>/*.JPEG`` (ImageNet); key ``<class>/<file>``.
* ``folder``: every image file below ``root`` (recursive); key = relative path.
* ``list``: ``root`` is a text file of image paths (one per line, relative to the file's folder; ``#`` comments).
* ``wds``: ``root`` is a brace pattern of WebDataset tar shards; image entries only; key ``<shard>/<member>``.

Preprocessing follows the paper's teacher (guided-diffusion's ``center_crop_arr``): box-downsample by 2 while the
shorter side is >= 2x the target, bicubic resize of the shorter side to ``resolution``, center crop. Every image
is converted to 8-bit RGB by :func:`to_rgb`, mode by mode (the table there): 16-bit grayscale is scaled by 1/257
(PIL's own ``convert("RGB")`` clips it, so a 16-bit PNG came out white), transparent images are composited onto
white, and modes without a defined display range (32-bit float) are rejected. A file that cannot be decoded (not an
image, truncated, decompression bomb, unsupported mode) is NOT an error: it comes back as a reject with the reason.

Keys are what the bank stores (a fixed-width field, ``bank.spec.KEY_BYTES``). A relative path longer than that, or
one the field cannot hold, gets a deterministic shortened key (:func:`storable_key`) when the images are listed,
before any teacher work; the record keeps the full path as ``full_key``.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.context
import os
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from configlib import ConfigError, require_resolved
from sources.datasets import DatasetConfig, ensure_available

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)

# What PIL raises on a file it cannot decode: not an image (UnidentifiedImageError), truncated data / bad
# headers (OSError, SyntaxError from some plugins, ValueError), oversized (DecompressionBombError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable key and where its bytes are."""

    key: str
    """Stable id (relative path); recorded in the bank and used to derive the noise seeds."""
    path: str
    """File to read (the image itself, or the tar shard for ``wds``)."""
    offset: int = -1
    """``wds``: byte offset of the member's data inside the tar; -1 = the whole file is the image."""
    size: int = -1
    """``wds``: byte size of the member's data."""
    full_key: str = ""
    """The full relative path when ``key`` is a shortened one (:func:`storable_key`); empty = same as ``key``."""

    def __post_init__(self) -> None:
        if not self.full_key:
            object.__setattr__(self, "full_key", self.key)


# ------------------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_folder(folder: Path) -> list[ImageRecord]:
    records = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if _is_image(name):
                path = Path(dirpath) / name
                records.append(ImageRecord(key=path.relative_to(folder).as_posix(), path=str(path)))
    return records


def _list_imagefolder(root: Path, split: str) -> list[ImageRecord]:
    split_dir = root / split if split else root
    if not split_dir.is_dir():
        raise ConfigError(
            f"imagefolder layout: {split_dir} is not a folder (expected <root>/<split>/<class>/*.JPEG)"
        )
    return _list_folder(split_dir)


def _list_file(list_file: Path) -> list[ImageRecord]:
    if not list_file.is_file():
        raise ConfigError(f"list layout: root {list_file} must be a text file of image paths")
    base = list_file.parent
    records = []
    for line in list_file.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry) if os.path.isabs(entry) else base / entry
        records.append(ImageRecord(key=Path(entry).as_posix(), path=str(path)))
    return records


def _list_wds(pattern: str) -> list[ImageRecord]:
    # webdataset streams samples sequentially; encode needs random access by image index (each shard task reads
    # only its own images), so the tar headers are indexed here with the stdlib and members are read by offset.
    # Shard patterns use braceexpand (webdataset's own dependency), as webdataset does.
    from braceexpand import braceexpand

    records = []
    for shard in braceexpand(pattern):
        if not os.path.isfile(shard):
            raise ConfigError(f"wds layout: shard {shard} (from {pattern!r}) does not exist")
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile() and _is_image(member.name):
                    key = f"{Path(shard).name}/{member.name}"
                    records.append(ImageRecord(key, shard, member.offset_data, member.size))
    return records


# Must equal bank.spec.KEY_BYTES (the bank's fixed key field); sources sits below bank and cannot import it, so the
# value is repeated here and a test (tests/test_images.py) asserts the two agree.
MAX_KEY_BYTES = 64
_HASH_HEX = 16
"""Hex digits of sha256 in a shortened key (64 bits): two long paths with the same prefix collide with odds
n^2 / 2^65 (4e-8 for all 1.28M ImageNet paths); a collision is an error naming both paths, never a silent merge."""


def storable_key(key: str, max_bytes: int = MAX_KEY_BYTES) -> str:
    """``key`` itself when the bank can store it (at most ``max_bytes`` UTF-8 bytes, no NUL); otherwise a shortened
    key: the longest prefix of ``key`` that fits (cut at a character boundary, NULs removed) + ``~`` + the first
    16 hex digits of sha256(full key). Deterministic (the same path always gets the same key, on every machine), so
    the noise seeds derived from it and resumed banks agree; readable (it starts like the path)."""
    raw = key.encode("utf-8")
    if len(raw) <= max_bytes and b"\0" not in raw:
        return key
    suffix = "~" + hashlib.sha256(raw).hexdigest()[:_HASH_HEX]
    room = max_bytes - len(suffix)
    if room < 0:
        raise ValueError(f"max_bytes={max_bytes} leaves no room for the {len(suffix)}-byte hash suffix")
    prefix = raw.replace(b"\0", b"")[:room].decode(
        "utf-8", errors="ignore"
    )  # drops a cut multi-byte character
    return prefix + suffix


def _shorten_keys(name: str, records: list[ImageRecord], max_bytes: int) -> list[ImageRecord]:
    """Give every key the bank cannot store a :func:`storable_key`; two records with one key is an error."""
    out = []
    for record in records:
        key = storable_key(record.key, max_bytes)
        out.append(record if key == record.key else ImageRecord(key, record.path, record.offset, record.size,
                                                                full_key=record.key))  # fmt: skip
    by_key: dict[str, str] = {}
    for record in out:
        other = by_key.setdefault(record.key, record.full_key)
        if other != record.full_key:
            raise ConfigError(
                f"dataset {name!r}: {other!r} and {record.full_key!r} both get the bank key {record.key!r} "
                f"(paths longer than {max_bytes} UTF-8 bytes are shortened to a prefix + '~' + 16 hex digits of "
                "their sha256); rename one of them"
            )
    return out


def list_images(name: str, dataset: DatasetConfig, max_key_bytes: int = MAX_KEY_BYTES) -> list[ImageRecord]:
    """All images of dataset ``name`` in deterministic (key-sorted) order, truncated to ``dataset.limit``.

    Every key fits the bank's key field (``max_key_bytes``, which must equal ``bank.spec.KEY_BYTES``): longer paths
    get a :func:`storable_key` here, before any teacher work, so that one long path cannot fail a shard after the
    teacher pass and abort an ImageNet-scale run. The order is that of the full paths."""
    if not dataset.root.strip():
        raise ConfigError(
            f"datasets.{name}.root is empty (is the environment variable it names, e.g. IMAGENET_ROOT, set to an "
            "empty string?); point it at the data"
        )
    if dataset.layout == "wds":
        records = _list_wds(require_resolved(dataset.root, f"datasets.{name}.root"))
    else:
        root = ensure_available(name, dataset)
        listers = {
            "imagefolder": lambda: _list_imagefolder(root, dataset.split),
            "folder": lambda: _list_folder(root),
            "list": lambda: _list_file(root),
        }
        if dataset.layout not in listers:
            raise ConfigError(
                f"datasets.{name}.layout={dataset.layout!r} is not an image layout; "
                f"choices: {', '.join(sorted([*listers, 'wds']))}"
            )
        records = listers[dataset.layout]()
    records.sort(key=lambda r: r.key)
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"dataset {name!r}: duplicate image keys (two list entries name the same file?)")
    records = _shorten_keys(name, records, max_key_bytes)
    if dataset.limit:
        records = records[: dataset.limit]
    if not records:
        raise ConfigError(f"dataset {name!r} ({dataset.layout} at {dataset.root}) contains no images")
    return records


def keys_sha256(keys: Sequence[str]) -> str:
    """Fingerprint of an ordered key list (newline-joined UTF-8)."""
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Decoding and preprocessing
# ------------------------------------------------------------------------------------------------------------
def read_bytes(record: ImageRecord) -> bytes:
    if record.offset < 0:
        return Path(record.path).read_bytes()
    with open(record.path, "rb") as f:
        f.seek(record.offset)
        return f.read(record.size)


class UnsupportedImage(ValueError):
    """An image PIL decodes but that has no well-defined 8-bit RGB rendering (a reject, with this as the reason)."""


ALPHA_BACKGROUND = 255
"""Transparent pixels are composited onto white (this grey level in every channel). Why not drop alpha, as
guided-diffusion's ``convert("RGB")`` does: the colour under a fully transparent pixel is undefined (often black,
or whatever an editor left there), so dropping alpha feeds the teacher arbitrary pixels; white is what an image
viewer shows on a default page, and transparent images (product shots, logos) are made to be seen on one."""

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# PIL's own conversion to RGB is exact (or the standard formula) for these: 1 -> 0/255, L -> grey, P -> palette
# colour, CMYK -> (255-C)(255-K)/255, YCbCr (JPEG full range), HSV, LAB (D65), RGBX -> drop the pad byte.
_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"})


def _grey16_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey (``I;16*``, or ``I``, which PIL uses for 16-bit PGM / older 16-bit PNG) -> RGB, v -> round(v/257)
    (65535 -> 255 exactly). ``I`` is 32-bit signed: values outside 0..65535 have no defined range -> reject."""
    grey = np.asarray(image)
    if image.mode == "I" and grey.size and (int(grey.min()) < 0 or int(grey.max()) > 65535):
        raise UnsupportedImage(
            f"32-bit integer image (mode I) with values {int(grey.min())}..{int(grey.max())} outside the 16-bit "
            "range 0..65535: no display range is defined; convert it to 8- or 16-bit"
        )
    grey_u8 = ((grey.astype(np.uint32) + 128) // 257).astype(
        np.uint8
    )  # == round(v / 257): 257 is odd, no ties
    return Image.fromarray(np.repeat(grey_u8[..., None], 3, axis=2), "RGB")


def _composite_on_background(image: Image.Image) -> Image.Image:
    """Any image with alpha -> RGB over :data:`ALPHA_BACKGROUND`: round((c*a + bg*(255-a)) / 255) per channel."""
    if image.mode == "La":  # premultiplied; PIL converts La only to LA
        image = image.convert("LA")
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
    alpha = rgba[..., 3:]
    mixed = rgba[..., :3] * alpha + ALPHA_BACKGROUND * (255 - alpha)
    return Image.fromarray(((mixed + 127) // 255).astype(np.uint8), "RGB")  # == round(x / 255): no ties


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB rendering of a decoded image, by mode. Raises :class:`UnsupportedImage` for a mode that has none.

    ======================================  =====================================================================
    RGB (no transparency key)               unchanged
    1, L, P, CMYK, YCbCr, HSV, LAB, RGBX    PIL's conversion (exact; CMYK by the naive formula: ICC profiles are
                                            ignored, as for every mode)
    I;16, I;16L, I;16B, I;16N               v -> round(v / 257), grey in all three channels
    I (32-bit int)                          as 16-bit if every value is in 0..65535, else rejected
    F (32-bit float)                        rejected: no display range is defined (0..1? 0..255?)
    RGBA, LA, PA, RGBa, La; P / L / RGB     composited onto white (:data:`ALPHA_BACKGROUND`)
    with a transparency key
    anything else                           rejected, naming the mode
    ======================================  =====================================================================
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _grey16_to_rgb(image)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in image.info):
        return _composite_on_background(image)
    if mode == "RGB":
        return image
    if mode in _CONVERTIBLE_MODES:
        return image.convert("RGB")
    if mode == "F":
        raise UnsupportedImage(
            "32-bit float image (mode F): no display range is defined (0..1? 0..255?); convert it to 8- or 16-bit"
        )
    raise UnsupportedImage(f"image mode {mode} has no defined conversion to RGB; convert the file to RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (so truncation surfaces here) and convert to 8-bit RGB (:func:`to_rgb`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(BytesIO(data))
        image.load()
    return to_rgb(image)


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """guided-diffusion's ``center_crop_arr``: shorter side -> ``resolution`` (box halving, then bicubic), center
    crop. Returns uint8 ``(3, resolution, resolution)``."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(max(resolution, round(x * scale)) for x in image.size), resample=Image.BICUBIC)
    arr_HWC = np.asarray(image, dtype=np.uint8)
    top = (arr_HWC.shape[0] - resolution) // 2
    left = (arr_HWC.shape[1] - resolution) // 2
    crop_HWC = arr_HWC[top : top + resolution, left : left + resolution]
    return np.ascontiguousarray(crop_HWC.transpose(2, 0, 1))  # (3, H, W)


def load_image(record: ImageRecord, resolution: int) -> tuple[np.ndarray | None, str]:
    """``(uint8 (3, R, R), "")`` or ``(None, reason)`` when the file cannot be read or decoded."""
    try:
        data = read_bytes(record)
        image = decode_rgb(data)
    except (*DECODE_ERRORS, Image.DecompressionBombWarning) as exc:
        # PIL names the in-memory buffer's address in some messages; drop it so that reasons are reproducible
        return None, _BUFFER_REPR.sub("", f"{type(exc).__name__}: {exc}")
    return center_crop_resize(image, resolution), ""


def to_model_range(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (same shape, same device)."""
    return images_u8.float().div_(127.5).sub_(1.0)


# ------------------------------------------------------------------------------------------------------------
# Decoding: a Dataset (teacher training's DataLoader) and a pool that outlives record lists (encode)
# ------------------------------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset of preprocessed images; a reject yields zeros with ``ok=False`` and the reason."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int) -> None:
        self.records = list(records)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image_u8, reason = load_image(record, self.resolution)
        ok = image_u8 is not None
        if image_u8 is None:
            image_u8 = np.zeros((3, self.resolution, self.resolution), np.uint8)
        return {
            "index": index,
            "key": record.key,
            "image_u8": torch.from_numpy(image_u8),  # (3, R, R) uint8
            "ok": ok,
            "reason": reason,
        }


def _worker_context() -> multiprocessing.context.BaseContext:
    """Start method for decoding workers: forkserver, preloaded with torch and this module.

    Decoding workers are started from task threads (encode runs several shards per process) in a process that runs
    zarr's event-loop thread and, under dask, the worker's communication threads. Forking such a process copies
    locks held by other threads into the child, which then can die or hang at random. The forkserver forks
    from a single-threaded server instead; preloading keeps a new worker's start at milliseconds.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "PIL.Image", __name__])
    return ctx


def decode_batch(records: Sequence[ImageRecord], resolution: int) -> tuple[np.ndarray, list[bool], list[str]]:
    """Decode ``records``: ``(uint8 (B, 3, R, R), ok per image, reason per image)``; a reject's pixels are zero.

    Plain numpy and lists, so a worker process returns them through a pipe without torch's shared-memory handles.
    """
    images_u8 = np.zeros((len(records), 3, resolution, resolution), np.uint8)
    ok, reasons = [], []
    for i, record in enumerate(records):
        image_u8, reason = load_image(record, resolution)
        if image_u8 is not None:
            images_u8[i] = image_u8
        ok.append(image_u8 is not None)
        reasons.append(reason)
    return images_u8, ok, reasons


class DecodePool:
    """Decoding worker processes that outlive the record lists they decode, ``prefetch_factor`` batches each ahead.

    Why not a DataLoader: its workers are bound to the dataset they were started with, so the encode stage (one
    record list per shard) started and joined its decoding workers once per shard, a per-shard cost that competes
    with the teacher for the host CPU (``make bench-encode``; figures and their spread in docs/benchmarks.md).
    This pool starts its workers once and takes batches of any record list.
    ``num_workers=0`` decodes in the calling thread. Thread-safe: several task threads may share one pool.
    """

    def __init__(self, num_workers: int, prefetch_factor: int = 2) -> None:
        self.lookahead = max(1, num_workers * prefetch_factor)
        self.broken = False
        """A worker process died; the pool cannot be used again (build a new one)."""
        self._pool = (
            ProcessPoolExecutor(num_workers, mp_context=_worker_context()) if num_workers > 0 else None
        )

    def batches(
        self, records: Sequence[ImageRecord], resolution: int, batch_size: int, *, pin_memory: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Batches of ``records`` in order, as dicts: ``index`` (B,) position in ``records``, ``key`` list[str],
        ``image_u8`` (B, 3, R, R) uint8, ``ok`` (B,) bool, ``reason`` list[str]."""
        starts = iter(range(0, len(records), batch_size))

        def decode(start: int) -> Any:
            chunk = records[start : start + batch_size]
            if self._pool is None:
                return decode_batch(chunk, resolution)
            return self._pool.submit(decode_batch, chunk, resolution)

        # 1. Keep `lookahead` batches in flight (in order); synchronous without workers.
        in_flight = deque((start, decode(start)) for start in islice(starts, self.lookahead))
        try:
            while in_flight:
                start, pending = in_flight.popleft()
                try:
                    images_u8, ok, reasons = pending if self._pool is None else pending.result()
                except BrokenProcessPool:
                    self.broken = True
                    raise
                # 2. Refill before handing the batch over, so the workers decode while the caller computes.
                following = next(starts, None)
                if following is not None:
                    in_flight.append((following, decode(following)))
                image_u8 = torch.from_numpy(images_u8)
                yield {
                    "index": torch.arange(start, start + len(ok)),
                    "key": [r.key for r in records[start : start + len(ok)]],
                    "image_u8": image_u8.pin_memory() if pin_memory else image_u8,
                    "ok": torch.tensor(ok, dtype=torch.bool),
                    "reason": reasons,
                }
        finally:  # the caller stopped early (an error): drop what it will not read
            if self._pool is not None:
                for _, pending in in_flight:
                    pending.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS",
    "MAX_KEY_BYTES",
    "DecodePool",
    "ImageDataset",
    "ImageRecord",
    "UnsupportedImage",
    "center_crop_resize",
    "decode_batch",
    "decode_rgb",
    "keys_sha256",
    "list_images",
    "load_image",
    "read_bytes",
    "storable_key",
    "to_model_range",
    "to_rgb",
]
