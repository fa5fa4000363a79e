"""ADE20K (SceneParsing, ``ADEChallengeData2016``) in its official layout.

``<root>/images/{training,validation}/*.jpg`` with ``<root>/annotations/{training,validation}/<stem>.png``;
``root`` may also be the folder that contains ``ADEChallengeData2016``. Labels: 0 = other (ignored), 1..150 the
classes, mapped to 0..149 (reduce-zero-label). Class names come from ``objectInfo150.txt`` / ``.csv`` (shipped with
the official zip) or ``classes.txt`` (one name per line); the class count from ``classes.txt`` if present, else 150.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sources.segmentation import SegPair

SPLITS = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ADE_NUM_CLASSES = 150


def ade_root(root: Path) -> Path:
    nested = root / "ADEChallengeData2016"
    return nested if nested.is_dir() else root


def ade20k_pairs(root: Path, split: str) -> list[SegPair]:
    """Sorted image/annotation pairs of ``split`` (train / val); a missing annotation is an error naming it."""
    if split not in SPLITS:
        raise ValueError(f"ADE20K split {split!r}; choices: {', '.join(SPLITS)}")
    base = ade_root(root)
    image_dir, label_dir = base / "images" / SPLITS[split], base / "annotations" / SPLITS[split]
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{image_dir} does not exist; expected the ADEChallengeData2016 layout images/{{training,validation}}"
        )
    pairs = []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"annotation {label} for image {image} is missing")
        pairs.append(SegPair(image, label))
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return pairs


def read_class_names(path: Path) -> list[str]:
    """``classes.txt`` (one per line) or objectInfo150 (.txt tab-separated / .csv; column Name, first synonym)."""
    if path.name == "classes.txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".txt" else ","))
    if not rows or "Name" not in rows[0]:
        raise ValueError(f"{path}: expected a header with a 'Name' column (objectInfo150 format)")
    return [row["Name"].split(";")[0].strip() for row in rows]


def ade20k_class_names(root: Path, num_classes: int) -> list[str]:
    """Class names for ``num_classes`` (0 = from ``classes.txt`` if present, else 150)."""
    base = ade_root(root)
    names: list[str] = []
    for candidate in ("classes.txt", "objectInfo150.txt", "objectInfo150.csv"):
        if (base / candidate).is_file():
            names = read_class_names(base / candidate)
            break
    count = num_classes or (len(names) if (base / "classes.txt").is_file() else ADE_NUM_CLASSES)
    return [names[k] if k < len(names) else f"class_{k}" for k in range(count)]
