"""Label-efficient segmentation sets in the layout of the ddpm-segmentation benchmarks.

``<root>/{train,test}/<stem>.{jpg,jpeg,png}`` images, each with an integer class map ``<stem>.npy`` beside it
(bedroom-28, ffhq-34, cat-15, horse-21: point ``root`` at their ``real/`` folder), or a label ``<stem>.png`` /
``<stem>.npy`` in ``<root>/{train,test}/labels/``. Class ids 0..K-1, 255 = ignore; no reduce-zero-label.
``<root>/classes.txt`` (one name per line) gives the classes; without it set
``finetune.segmentation.num_classes``.
"""

from __future__ import annotations

from pathlib import Path

from finetune.seg_data import SegPair

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def fewshot_pairs(root: Path, split: str) -> list[SegPair]:
    """Sorted image/label pairs of ``split``; an image without a label is an error naming the expected files."""
    if split not in SPLITS:
        raise ValueError(f"label-efficient split {split!r}; choices: {', '.join(SPLITS)}")
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
