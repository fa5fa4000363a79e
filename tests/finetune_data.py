"""Tiny datasets in the real finetune layouts (ADE20K, COCO, label-efficient), written by the finetune tests.

Images are coloured rectangles on a grey background; the colour determines the class, so a few training steps
have something to learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

COLOURS = np.array(
    [[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 210, 40], [200, 60, 200]], dtype=np.uint8
)


def scene(rng: np.random.Generator, size: int, num_classes: int, boxes: int = 2):
    """(image HxWx3 uint8, class map HxW int with -1 = background, list of (class, x0, y0, x1, y1))."""
    image = np.full((size, size, 3), 128, np.uint8)
    label = np.full((size, size), -1, np.int64)
    objects = []
    for _ in range(boxes):
        cls = int(rng.integers(num_classes))
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, size=2))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        image[y0 : y0 + h, x0 : x0 + w] = COLOURS[cls % len(COLOURS)]
        label[y0 : y0 + h, x0 : x0 + w] = cls
        objects.append((cls, x0, y0, x0 + w, y0 + h))
    return image, label, objects


def write_ade20k(root: Path, n_train: int = 6, n_val: int = 3, size: int = 48, num_classes: int = 4) -> Path:
    """ADEChallengeData2016 layout; 0 = other, k + 1 = class k; classes.txt with ``num_classes`` names."""
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split, count in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label, _ = scene(rng, size, num_classes)
            stem = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(base / "images" / split / f"{stem}.jpg", quality=95)
            Image.fromarray((label + 1).astype(np.uint8), mode="L").save(
                base / "annotations" / split / f"{stem}.png"
            )
    (base / "classes.txt").write_text("\n".join(f"thing{k}" for k in range(num_classes)) + "\n")
    return root


def write_fewshot(
    root: Path, n_train: int = 4, n_test: int = 2, size: int = 48, num_classes: int = 3
) -> Path:
    """``<root>/{train,test}/<stem>.png`` + ``<stem>.npy`` (uint8, 255 = ignore) + ``classes.txt``."""
    rng = np.random.default_rng(1)
    for split, count in (("train", n_train), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label, _ = scene(rng, size, num_classes - 1)
            label = label + 1  # background = class 0
            label[:2, :2] = 255  # a few ignored pixels
            Image.fromarray(image).save(root / split / f"img{i:03d}.png")
            np.save(root / split / f"img{i:03d}.npy", label.astype(np.uint8))
    (root / "classes.txt").write_text(
        "background\n" + "\n".join(f"part{k}" for k in range(num_classes - 1)) + "\n"
    )
    return root


def _polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]


def write_coco(root: Path, n_train: int = 4, n_val: int = 3, size: int = 64) -> Path:
    """COCO layout with polygons, a compressed-RLE instance, a crowd region (uncompressed RLE) and images without
    annotations (the last image of each split). Category ids are non-contiguous (3, 7) as in real COCO."""
    rng = np.random.default_rng(2)
    categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = 100 + i
            empty = i == count - 1
            image, _, objects = scene(rng, size, 2, boxes=0 if empty else 2)
            file_name = f"{image_id:012d}.jpg"
            Image.fromarray(image).save(root / split / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            for k, (cls, x0, y0, x1, y1) in enumerate(objects):
                ann = {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": categories[cls]["id"],
                    "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": float((x1 - x0) * (y1 - y0)),
                }
                if k == 1 and i == 0:  # one instance as compressed RLE
                    binary = np.zeros((size, size), np.uint8, order="F")
                    binary[y0:y1, x0:x1] = 1
                    rle = mask_utils.encode(binary)
                    ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                else:
                    ann["segmentation"] = _polygon(x0, y0, x1, y1)
                annotations.append(ann)
                ann_id += 1
            if (
                i == 1
            ):  # a crowd region in uncompressed RLE (counts list, column-major), as COCO stores crowds
                crowd = np.zeros((size, size), np.uint8)
                crowd[size - 8 :, size - 8 :] = 1
                counts, flat, run, current = [], crowd.flatten(order="F"), 0, 0
                for value in flat:
                    if value != current:
                        counts.append(run)
                        run, current = 0, value
                    run += 1
                counts.append(run)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": 3,
                        "iscrowd": 1,
                        "bbox": [size - 8, size - 8, 8, 8],
                        "area": 64.0,
                        "segmentation": {"size": [size, size], "counts": counts},
                    }
                )
                ann_id += 1
        split_name = split.replace("2017", "")
        payload = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split_name}2017.json").write_text(json.dumps(payload))
    return root
