"""Built-in demo scenes: determinism, exact labels in every layout, atomic generation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sources import demo_scenes as demo_data
from sources.datasets import DatasetConfig, ensure_available


@pytest.fixture()
def small_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {k: 6 for k in demo_data.COUNTS}
    counts["coco-train"] = counts["coco-val"] = (
        2 * demo_data.CROWD_EVERY
    )  # includes a crowd and an empty image
    monkeypatch.setattr(demo_data, "COUNTS", counts)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.mark.parametrize("layout", ["folder", "ade20k", "coco", "fewshot"])
def test_same_seed_same_bytes(tmp_path: Path, small_counts: None, layout: str) -> None:
    demo_data.generate(tmp_path / "a", layout, progress=False)
    demo_data.generate(tmp_path / "b", layout, progress=False)
    digest = _digest(tmp_path / "a")
    assert digest and digest == _digest(tmp_path / "b")
    assert not list(tmp_path.glob(".*tmp*"))  # the temp folder was renamed away


def test_scene_labels_match_pixels() -> None:
    scene = demo_data.render_scene(123)
    assert scene.image_HW3.shape == (64, 64, 3) and scene.image_HW3.dtype == np.uint8
    assert scene.instances
    # Visible instance masks are disjoint and, with the class ids, reproduce the semantic map exactly.
    rebuilt = np.zeros_like(scene.semantic_HW)
    coverage = np.zeros(scene.semantic_HW.shape, np.int32)
    for inst in scene.instances:
        rebuilt[inst["visible"] > 0] = inst["class_id"]
        coverage += inst["visible"]
    assert coverage.max() == 1
    np.testing.assert_array_equal(rebuilt, scene.semantic_HW)
    empty = demo_data.render_scene(5, empty=True)
    assert not empty.instances and not empty.semantic_HW.any()


def test_splits_use_disjoint_seeds() -> None:
    a = demo_data.scene_for("unlabeled", 0).image_HW3
    b = demo_data.scene_for("fewshot-train", 0).image_HW3
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="choices"):
        demo_data.scene_for("nope", 0)


def test_ade20k_layout_convention(tmp_path: Path, small_counts: None) -> None:
    demo_data.generate(tmp_path / "ade", "ade20k", progress=False)
    ann = tmp_path / "ade" / "annotations" / "training" / "demo_training_00000.png"
    labels = np.asarray(Image.open(ann))
    scene = demo_data.scene_for("ade-training", 0)
    np.testing.assert_array_equal(labels, scene.semantic_HW + 1)  # background (class 0) stored as 1
    assert labels.min() >= 1 and labels.max() <= demo_data.NUM_CLASSES
    assert (tmp_path / "ade" / "images" / "validation" / "demo_validation_00000.png").is_file()


def test_coco_annotations_decode_to_exact_masks(tmp_path: Path, small_counts: None) -> None:
    demo_data.generate(tmp_path / "coco", "coco", progress=False)
    ann_file = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    coco = COCO(str(ann_file))
    data = json.loads(ann_file.read_text())
    kinds = {"polygon": 0, "rle": 0, "crowd": 0}
    for i, image in enumerate(data["images"]):
        assert (tmp_path / "coco" / "train2017" / image["file_name"]).is_file()
        scene = demo_data.scene_for("coco-train", i)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=None))
        assert len(anns) == len(scene.instances)
        for ann, inst in zip(anns, scene.instances, strict=True):
            np.testing.assert_array_equal(coco.annToMask(ann), inst["visible"])
            assert ann["category_id"] == inst["class_id"]
            assert ann["area"] == pytest.approx(float(mask_utils.area(coco.annToRLE(ann))))
            if ann["iscrowd"]:
                kinds["crowd"] += 1
            else:
                kinds["polygon" if isinstance(ann["segmentation"], list) else "rle"] += 1
    assert all(kinds.values()), kinds
    assert any(not coco.getAnnIds(imgIds=image["id"]) for image in data["images"])  # an image without objects


def test_fewshot_layout(tmp_path: Path, small_counts: None) -> None:
    demo_data.generate(tmp_path / "fs", "fewshot", progress=False)
    classes = (tmp_path / "fs" / "classes.txt").read_text().split()
    assert classes == list(demo_data.CLASSES)
    labels = np.load(tmp_path / "fs" / "train" / "demo_00000.npy", allow_pickle=False)
    assert labels.dtype == np.uint8 and labels.shape == (64, 64) and labels.max() < len(classes)
    assert len(list((tmp_path / "fs" / "test").glob("*.png"))) == 6


def test_ensure_available_generates_once(tmp_path: Path, small_counts: None) -> None:
    cfg = DatasetConfig(root=str(tmp_path / "unl"), layout="folder", generator="demo-scenes")
    root = ensure_available("demo", cfg)
    assert len(list(root.glob("*.png"))) == 6
    (root / "scene_00000.png").unlink()
    ensure_available("demo", cfg)  # the root exists: nothing is rewritten
    assert len(list(root.glob("*.png"))) == 5


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="choices"):
        demo_data.generate(Path("/nonexistent"), "imagefolder")
