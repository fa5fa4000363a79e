"""Image sources shared by encode, teacher training and online distillation.

Four layouts (``DatasetConfig.layout``), each listed into :class:`ImageRecord` s with a stable key (the image's
path relative to the dataset root) in a deterministic sorted order:

* ``imagefolder``: ``<root>/<split>/<class>/*.JPEG`` (ImageNet); key ``<class>/<file>``.
* ``folder``: every image file below ``root`` (recursive); key = relative path.
* ``list``: ``root`` is a text file of image paths (one per line, relative to the file's folder; ``#`` comments).
* ``wds``: ``root`` is a brace pattern of WebDataset tar shards; image entries only; key ``<shard>/<member>``.

Preprocessing follows the paper's teacher (guided-diffusion's ``center_crop_arr``): box-downsample by 2 while the
shorter side is >= 2x the target, bicubic resize of the shorter side to ``resolution``, center crop. Images are
converted to RGB (grayscale, palette, CMYK, RGBA -> alpha dropped, as guided-diffusion does). A file that cannot be
decoded (not an image, truncated, decompression bomb) is NOT an error: it comes back as a reject with the reason.
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


def list_images(name: str, dataset: DatasetConfig) -> list[ImageRecord]:
    """All images of dataset ``name`` in deterministic (key-sorted) order, truncated to ``dataset.limit``."""
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


def decode_rgb(data: bytes) -> Image.Image:
    """Decode fully (so truncation surfaces here) and convert to RGB."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(BytesIO(data))
        image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


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
    "IMAGE_EXTENSIONS",
    "DecodePool",
    "ImageDataset",
    "ImageRecord",
    "center_crop_resize",
    "decode_batch",
    "decode_rgb",
    "keys_sha256",
    "list_images",
    "load_image",
    "read_bytes",
    "to_model_range",
]
