"""Built-in demo data: deterministic 64x64 scenes of textured shapes with exact semantic and instance labels.

Registered in :data:`sources.datasets.GENERATORS` as ``demo-scenes``; ``ensure_available`` calls
:func:`generate` the first time a demo dataset's root is missing. Every layout the stages read is written from
the same scene renderer:

* ``folder``   ``<root>/<id>.png`` unlabeled images (teacher training, the feature bank);
* ``ade20k``   ``<root>/images/{training,validation}/<id>.png`` + ``<root>/annotations/...<id>.png``,
  ADE convention: 0 = unlabelled (ignore), class ``k`` stored as ``k + 1`` (background is class 0 -> value 1);
* ``coco``     ``<root>/{train2017,val2017}/<id>.png`` + ``<root>/annotations/instances_{train,val}2017.json``:
  polygons for unoccluded objects, RLE for occluded ones, one iscrowd region per few images, empty images;
* ``fewshot``  ``<root>/{train,test}/<stem>.png`` + ``<stem>.npy`` (uint8 class ids, 255 = ignore) and
  ``<root>/classes.txt``.

Shapes are rasterised from polygons with pycocotools (``frPyObjects`` + ``decode``), so a COCO polygon decodes to
exactly the pixels the image was composited with: labels are exact, not re-traced. Each split draws scenes from
its own seed range (unlabeled pool, labeled train, test never share a scene). Output is written to a temporary
sibling folder and renamed at the end, so an interrupted generation leaves nothing that looks complete.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

SIZE = 64
CLASSES: tuple[str, ...] = ("background", "disc", "square", "triangle", "star", "cross")
"""Semantic classes; index = class id. Object classes are 1..5."""
NUM_CLASSES = len(CLASSES)
IGNORE = 255

# Disjoint scene-seed ranges per split (a scene's seed = base + index).
SPLIT_SEEDS: dict[str, int] = {
    "unlabeled": 0,
    "ade-training": 1_000_000,
    "ade-validation": 2_000_000,
    "coco-train": 3_000_000,
    "coco-val": 4_000_000,
    "fewshot-train": 5_000_000,
    "fewshot-test": 6_000_000,
}

# Image counts per layout/split; sized so that `make demo` fits its time budget on 2 CPU cores.
COUNTS: dict[str, int] = {
    "unlabeled": 2000,
    "ade-training": 200,
    "ade-validation": 50,
    "coco-train": 200,
    "coco-val": 50,
    "fewshot-train": 30,
    "fewshot-test": 100,
}

EMPTY_EVERY = 40
"""Every EMPTY_EVERY-th scene (index % EMPTY_EVERY == EMPTY_EVERY - 1) has no objects."""
CROWD_EVERY = 20
"""In COCO splits, the largest object of every CROWD_EVERY-th scene is annotated iscrowd=1 (uncompressed RLE)."""


# ----------------------------------------------------------------------------------------------------------
# Scene model
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    image_HW3: np.ndarray
    """uint8 RGB."""
    semantic_HW: np.ndarray
    """uint8 class ids (0 = background)."""
    instances: list[dict]
    """Per object, bottom to top: class_id, polygon (flat xy list), full_mask (HxW uint8), visible (HxW uint8)."""


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32)


# Per class: hue centre and a texture function. Hues are jittered by +-HUE_JITTER so neighbouring classes'
# colours overlap: colour alone does not name the class, shape and texture have to be used too.
CLASS_HUES: dict[int, float] = {1: 0.0, 2: 0.33, 3: 0.6, 4: 0.14, 5: 0.8}
HUE_JITTER = 0.12


def _texture(class_id: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W) pattern in [0, 1] that modulates the class colour: each class has its own kind of texture."""
    if class_id == 1:  # disc: smooth radial shading
        cy, cx = rng.uniform(0, SIZE, 2)
        return 1.0 - np.clip(np.hypot(yy - cy, xx - cx) / SIZE, 0, 1)
    if class_id == 2:  # square: checkerboard
        period = rng.integers(3, 6)
        return (((yy // period) + (xx // period)) % 2).astype(np.float32)
    if class_id == 3:  # triangle: diagonal stripes
        period = rng.uniform(3.0, 6.0)
        return 0.5 + 0.5 * np.sin(2 * math.pi * (xx + yy) / period)
    if class_id == 4:  # star: dots
        period = rng.integers(4, 7)
        return (((yy % period) < 2) & ((xx % period) < 2)).astype(np.float32)
    if class_id == 5:  # cross: horizontal stripes
        period = rng.uniform(2.5, 5.0)
        return 0.5 + 0.5 * np.sign(np.sin(2 * math.pi * yy / period))
    raise ValueError(f"no texture for class id {class_id}; object classes are 1..{NUM_CLASSES - 1}")


def _polygon(class_id: int, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] outline of the class's shape, centred at (cx, cy) with radius r."""
    if class_id == 1:
        pts = [(r, 2 * math.pi * k / 32) for k in range(32)]
    elif class_id == 2:
        pts = [(r, angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif class_id == 3:
        pts = [(r, angle + k * 2 * math.pi / 3) for k in range(3)]
    elif class_id == 4:
        pts = [(r if k % 2 == 0 else 0.45 * r, angle + k * math.pi / 5) for k in range(10)]
    elif class_id == 5:
        a, b = r, 0.35 * r  # arm length, half arm width
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b),
                   (-b, b), (-b, a)]  # fmt: skip
        pts = [(math.hypot(x, y), math.atan2(y, x) + angle) for x, y in corners]
    else:
        raise ValueError(f"no shape for class id {class_id}; object classes are 1..{NUM_CLASSES - 1}")
    flat: list[float] = []
    for radius, theta in pts:
        flat += [round(cx + radius * math.cos(theta), 2), round(cy + radius * math.sin(theta), 2)]
    return flat


def _rasterise(polygon: list[float]) -> np.ndarray:
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], SIZE, SIZE))
    return mask_utils.decode(rle).astype(np.uint8)  # (H, W)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Textured, low-saturation background: a two-colour blend along a random low-frequency wave plus grain."""
    c0 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7))
    c1 = _hsv_to_rgb(rng.uniform(), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.7))
    theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * math.pi)
    wave = 0.5 + 0.5 * np.sin(
        2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) / SIZE + phase
    )
    img = c0 * wave[..., None] + c1 * (1 - wave[..., None])
    return img + rng.normal(0, 0.03, img.shape).astype(np.float32)


def render_scene(seed: int, empty: bool = False) -> Scene:
    """Render one scene from its seed (same seed -> same arrays)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img_HW3 = _background(rng, yy, xx)
    semantic = np.zeros((SIZE, SIZE), np.uint8)
    instance_ids = np.zeros((SIZE, SIZE), np.int32)  # 0 = none, k = k-th object (1-based)
    objects: list[dict] = []
    n_objects = 0 if empty else int(rng.integers(1, 5))
    for k in range(n_objects):
        class_id = int(rng.integers(1, NUM_CLASSES))
        r = float(rng.uniform(7, 16))
        cx, cy = rng.uniform(r * 0.6, SIZE - r * 0.6, 2)
        polygon = _polygon(class_id, float(cx), float(cy), r, float(rng.uniform(0, 2 * math.pi)))
        full = _rasterise(polygon)
        if full.sum() < 16:
            continue
        colour = _hsv_to_rgb(
            (CLASS_HUES[class_id] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0, rng.uniform(0.6, 0.95), 1.0
        )
        tex = _texture(class_id, rng, yy, xx)
        shade = rng.uniform(0.7, 1.0) * (0.55 + 0.45 * tex)
        obj_HW3 = colour * shade[..., None]
        img_HW3 = np.where(full[..., None] > 0, obj_HW3, img_HW3)  # later objects occlude earlier ones
        semantic[full > 0] = class_id
        instance_ids[full > 0] = k + 1
        objects.append({"class_id": class_id, "polygon": polygon, "full_mask": full, "index": k + 1})
    instances = []
    for obj in objects:
        visible = (instance_ids == obj["index"]).astype(np.uint8)
        if visible.sum() == 0:
            continue  # fully hidden by later objects
        instances.append({**obj, "visible": visible})
    image = (np.clip(img_HW3, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Scene(image_HW3=image, semantic_HW=semantic, instances=instances)


def scene_for(split: str, index: int) -> Scene:
    """The ``index``-th scene of a split (seed range from :data:`SPLIT_SEEDS`)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown demo split {split!r}; choices: {', '.join(SPLIT_SEEDS)}")
    return render_scene(SPLIT_SEEDS[split] + index, empty=index % EMPTY_EVERY == EMPTY_EVERY - 1)


# ----------------------------------------------------------------------------------------------------------
# Writers (one per layout)
# ----------------------------------------------------------------------------------------------------------
def _png_bytes(array: np.ndarray) -> bytes:
    # Fixed PNG options: the same array always encodes to the same bytes (no timestamps or text chunks).
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(array))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _write_folder(root: Path, progress: bool) -> None:
    for i in tqdm(range(COUNTS["unlabeled"]), desc="demo data: unlabeled", disable=not progress, leave=False):
        _write_png(root / f"scene_{i:05d}.png", scene_for("unlabeled", i).image_HW3)


def _write_ade20k(root: Path, progress: bool) -> None:
    for split in ("training", "validation"):
        key = f"ade-{split}"
        for i in tqdm(
            range(COUNTS[key]), desc=f"demo data: ade20k {split}", disable=not progress, leave=False
        ):
            scene = scene_for(key, i)
            stem = f"demo_{split}_{i:05d}"
            _write_png(root / "images" / split / f"{stem}.png", scene.image_HW3)
            # ADE convention: 0 = unlabelled, class k stored as k + 1.
            _write_png(root / "annotations" / split / f"{stem}.png", scene.semantic_HW + 1)


def _rle_json(mask_HW: np.ndarray, compressed: bool) -> dict:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask_HW))
        return {"counts": rle["counts"].decode("ascii"), "size": [int(s) for s in rle["size"]]}
    # Uncompressed RLE (COCO's crowd format): run lengths over the column-major flattened mask, starting with 0s.
    flat = mask_HW.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [SIZE, SIZE]}


def coco_dict(split: str, count: int) -> tuple[dict, list[Scene]]:
    """COCO instances JSON for a split plus its scenes (image ids are 1-based, file names ``<id>.png``)."""
    images, annotations, scenes = [], [], []
    ann_id = 1
    for i in range(count):
        scene = scene_for(split, i)
        scenes.append(scene)
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"{image_id:012d}.png", "height": SIZE, "width": SIZE})
        crowd_index = -1
        if scene.instances and i % CROWD_EVERY == CROWD_EVERY - 2:
            crowd_index = int(np.argmax([inst["visible"].sum() for inst in scene.instances]))
        for j, inst in enumerate(scene.instances):
            visible = inst["visible"]
            occluded = bool((inst["full_mask"] != visible).any())
            if j == crowd_index:
                segmentation, iscrowd = _rle_json(visible, compressed=False), 1
            elif occluded:
                segmentation, iscrowd = _rle_json(visible, compressed=True), 0
            else:  # unoccluded: the polygon decodes to exactly these pixels (it is how they were drawn)
                segmentation, iscrowd = [inst["polygon"]], 0
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": inst["class_id"],
                "segmentation": segmentation, "area": float(visible.sum()),
                "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                "iscrowd": iscrowd,
            })  # fmt: skip
            ann_id += 1
    categories = [{"id": k, "name": CLASSES[k], "supercategory": "shape"} for k in range(1, NUM_CLASSES)]
    info = {"description": "DreamTeacher demo scenes (generated)", "version": "1.0"}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}, scenes


def _write_coco(root: Path, progress: bool) -> None:
    for split in ("train", "val"):
        key = f"coco-{split}"
        data, scenes = coco_dict(key, COUNTS[key])
        for image, scene in tqdm(list(zip(data["images"], scenes, strict=True)), desc=f"demo data: coco {split}",
                                 disable=not progress, leave=False):  # fmt: skip
            _write_png(root / f"{split}2017" / image["file_name"], scene.image_HW3)
        ann_path = root / "annotations" / f"instances_{split}2017.json"
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        ann_path.write_text(json.dumps(data))


def _write_fewshot(root: Path, progress: bool) -> None:
    for split in ("train", "test"):
        key = f"fewshot-{split}"
        for i in tqdm(
            range(COUNTS[key]), desc=f"demo data: fewshot {split}", disable=not progress, leave=False
        ):
            scene = scene_for(key, i)
            stem = f"demo_{i:05d}"
            _write_png(root / split / f"{stem}.png", scene.image_HW3)
            (root / split / f"{stem}.npy").write_bytes(_npy_bytes(scene.semantic_HW))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")


WRITERS: dict[str, Callable[[Path, bool], None]] = {
    "folder": _write_folder,
    "ade20k": _write_ade20k,
    "coco": _write_coco,
    "fewshot": _write_fewshot,
}


def generate(root: Path, layout: str, *, progress: bool = True) -> None:
    """Write the demo scenes in ``layout`` under ``root`` (atomically: temp folder, then rename)."""
    if layout not in WRITERS:
        raise ValueError(f"demo-scenes cannot write layout {layout!r}; choices: {', '.join(WRITERS)}")
    root = Path(root)
    if root.exists():
        return
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        WRITERS[layout](tmp, progress)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
