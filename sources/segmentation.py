"""Semantic-segmentation files (an image and its class-id map) and the label-efficient layout.

Ground for every stage that reads labelled images: fine-tuning (``finetune/``) and the feature interpreter
(``interpret/``).

The label-efficient sets are in the layout of the ddpm-segmentation benchmarks: ``<root>/{train,test}/<stem>.{jpg,jpeg,png}`` images, each with an integer class map ``<stem>.npy`` beside it
(bedroom-28, ffhq-34, cat-15, horse-21: point ``root`` at their ``real/`` folder), or a label ``<stem>.png`` /
``<stem>.npy`` in ``<root>/{train,test}/labels/``. Class ids 0..K-1, 255 = ignore; no reduce-zero-label.
``<root>/classes.txt`` (one name per line) gives the classes; without it set
``finetune.segmentation.num_classes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sources.images import to_rgb

IGNORE = 255


@dataclass(frozen=True)
class SegPair:
    image: Path
    label: Path


def read_image(path: Path) -> torch.Tensor:
    """RGB image -> float (3, H, W) in 0..255."""
    with Image.open(path) as im:
        # every PIL mode by the encode stage's rules (16-bit grey scaled, alpha on white): sources.images.to_rgb
        return torch.from_numpy(np.asarray(to_rgb(im), dtype=np.uint8).copy()).permute(2, 0, 1).float()


def read_label(path: Path) -> np.ndarray:
    """Class-id map (H, W) from a PNG (grey or palette indices) or a ``.npy`` integer array."""
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} is missing")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{path}: expected a 2-D integer class map, got {array.dtype} {array.shape}")
        return array.astype(np.int64)
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: label PNG must be single-channel (L/P/I), got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


def load_pair(pair: SegPair, num_classes: int, reduce_zero_label: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one sample -> image (3, H, W) float 0..255, label (H, W) int64 in 0..K-1 or 255."""
    image = read_image(pair.image)
    raw = read_label(pair.label)
    if tuple(raw.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"label {pair.label} is {raw.shape[1]}x{raw.shape[0]} but image {pair.image} is "
            f"{image.shape[2]}x{image.shape[1]} (WxH); they must match"
        )
    label = raw.copy()
    if reduce_zero_label:  # ADE20K: 0 = "other" -> ignore, k -> k - 1
        label[raw == 0] = IGNORE
        label[(raw != 0) & (raw != IGNORE)] -= 1
    bad = (label != IGNORE) & ((label < 0) | (label >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in raw[bad][:1000]})
        allowed = (
            f"1..{num_classes} (0 = ignore)" if reduce_zero_label else f"0..{num_classes - 1} (255 = ignore)"
        )
        raise ValueError(f"{pair.label}: label values {values[:10]} outside {allowed}; check num_classes")
    return image, torch.from_numpy(label)


FEWSHOT_SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def fewshot_pairs(root: Path, split: str) -> list[SegPair]:
    """Sorted image/label pairs of ``split``; an image without a label is an error naming the expected files."""
    if split not in FEWSHOT_SPLITS:
        raise ValueError(f"label-efficient split {split!r}; choices: {', '.join(FEWSHOT_SPLITS)}")
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist; expected <root>/{{train,test}}/ with images and .npy labels"
        )
    pairs = []
    for image in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        candidates = [folder / f"{image.stem}.npy", folder / "labels" / f"{image.stem}.png"]
        candidates.append(folder / "labels" / f"{image.stem}.npy")
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise FileNotFoundError(
                f"no label for {image}; expected one of {', '.join(map(str, candidates))}"
            )
        pairs.append(SegPair(image, label))
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return pairs


def fewshot_class_names(root: Path, num_classes: int) -> list[str]:
    path = root / "classes.txt"
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    count = num_classes or len(names)
    if count == 0:
        raise ValueError(
            f"{path} is missing; add it (one class name per line) or set finetune.segmentation.num_classes"
        )
    return [names[k] if k < len(names) else f"class_{k}" for k in range(count)]


def center_crop_resize_label(label_HW: np.ndarray, resolution: int) -> np.ndarray:
    """The class map of an image prepared by ``sources.images.center_crop_resize``: the same geometry (the
    shorter side to ``resolution``, center crop) with nearest-neighbour sampling, so labels stay class ids.

    The image's box halvings only shrink it before the final resize; the final size is recomputed from the
    halved size exactly as the image path does, so the label lands on the same pixel grid."""
    height, width = label_HW.shape
    size = (width, height)  # PIL order
    while min(size) >= 2 * resolution:
        size = (size[0] // 2, size[1] // 2)
    scale = resolution / min(size)
    size = tuple(max(resolution, round(x * scale)) for x in size)
    image = Image.fromarray(label_HW.astype(np.int32), mode="I")
    resized = np.asarray(image.resize(size, resample=Image.NEAREST)).astype(np.int64)
    top, left = (resized.shape[0] - resolution) // 2, (resized.shape[1] - resolution) // 2
    return np.ascontiguousarray(resized[top : top + resolution, left : left + resolution])
