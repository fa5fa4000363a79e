"""Demo report pictures: shared PCA colours and level errors, instance drawings, curves with validation metrics,
and no import circle with the demo."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bank import pca_rgb
from dreamteacher import report
from sources import demo_scenes as demo_data

REPO = Path(__file__).resolve().parents[1]


def _feature_map(seed: int = 0, c: int = 8, h: int = 6, w: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.2, c)[:, None, None]  # distinct variances: a well-defined PCA
    return (rng.standard_normal((c, h, w)) * scales).astype(np.float32)


def test_shared_basis_shows_a_difference_that_separate_pcas_hide() -> None:
    teacher = _feature_map()
    student = teacher[::-1].copy()  # the same pixels with the channels reversed: a different feature
    # Separate PCAs (the old figure) draw the two identically: PCA does not see a channel permutation.
    assert np.array_equal(pca_rgb(teacher), pca_rgb(student))
    basis = report.fit_pca(teacher)
    # In the teacher's basis the teacher looks as its own PCA does, and the student does not.
    np.testing.assert_array_equal(report.project_rgb(teacher, basis), pca_rgb(teacher))
    assert not np.array_equal(report.project_rgb(student, basis), report.project_rgb(teacher, basis))
    # Equal features give equal colours wherever they are: a shifted map is drawn as the shifted picture.
    shifted = np.roll(teacher, 2, axis=2)
    np.testing.assert_array_equal(
        report.project_rgb(shifted, basis), np.roll(report.project_rgb(teacher, basis), 2, axis=1)
    )


def test_level_error_is_the_mse_against_the_whitened_teacher() -> None:
    from distill.losses import whiten

    raw = torch.from_numpy(_feature_map()[None]) * 5 + 2
    target = whiten(raw, "sample")
    assert report.level_error(target, target) == 0.0
    assert report.level_error(torch.zeros_like(target), target) == pytest.approx(
        1.0, abs=1e-4
    )  # unit variance
    pred = target + 0.5  # hand value: every element off by 0.5
    assert report.level_error(pred, target) == pytest.approx(0.25, rel=1e-6)


def test_instances_are_drawn_with_class_colours_boxes_and_scores() -> None:
    image = np.full((16, 16, 3), 128, np.uint8)
    star = demo_data.CLASSES.index("star")
    colour = report.class_colours()[star]
    mask = np.zeros((1, 16, 16), np.uint8)
    mask[0, 4:8, 4:8] = 1
    drawn = report.draw_instances(
        image,
        np.array([[2.0, 2.0, 12.0, 12.0]]),
        np.array([star]),
        scores=np.array([0.9]),
        masks_NHW=mask,
        scale=4,
    )
    assert drawn.shape == (64, 64, 3) and drawn.dtype == np.uint8
    # Box outline (x = 2 * 4, width 2) in the class colour, on the row of the box's middle.
    np.testing.assert_array_equal(drawn[40, 8], colour)
    # Mask pixels blend the class colour in (alpha 0.45), untouched pixels stay grey.
    expected = np.round(0.45 * colour.astype(float) + 0.55 * 128).astype(int)
    assert np.abs(drawn[24, 24].astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(drawn[60, 60], [128, 128, 128])


def test_one_colour_per_class_everywhere() -> None:
    """The legend's colours are the few-label runs' predictions.png colours (finetune.report.palette)."""
    from finetune.report import colourise, palette

    labels = np.arange(demo_data.NUM_CLASSES)[None]
    np.testing.assert_array_equal(
        report._colour_labels(labels), colourise(labels, palette(demo_data.NUM_CLASSES))
    )
    assert len({tuple(c) for c in report.class_colours()}) == demo_data.NUM_CLASSES


def test_curves_read_validation_metrics_and_keep_the_last_of_a_repeated_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 1, "train/loss": 2.0},
        {"step": 2, "train/loss": 1.5},
        {"step": 2, "val/mIoU": 10.0},
        {"step": 2, "val/mIoU": 12.0},  # the same step logged again (resumed run)
        {"step": 4, "val/mIoU": 20.0},
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert report.series(run / "metrics.jsonl", "val/mIoU") == [(2, 12.0), (4, 20.0)]
    distill = tmp_path / "distill"
    distill.mkdir()
    (distill / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.0, "mse": 0.5, "at": 0.1, "mse/s4": 0.5})
    )
    path = report.loss_figure(tmp_path / "losses.png", distill, {("fewshot", "distilled", 0): run})
    assert path.is_file() and path.stat().st_size > 0


def test_coco_figure_draws_ground_truth_and_confident_detections(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "val2017" / "1.png")
    square = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    gt = {
        "images": [{"id": 1, "file_name": "1.png", "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": square, "bbox": [10, 10, 20, 20],
                         "area": 400.0, "iscrowd": 0}],
        "categories": [{"id": k, "name": demo_data.CLASSES[k]} for k in range(1, demo_data.NUM_CLASSES)],
    }  # fmt: skip
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    run = tmp_path / "run"
    run.mkdir()
    from pycocotools import mask as mask_utils

    binary = np.zeros((64, 64, 1), np.uint8, order="F")
    binary[12:30, 12:30] = 1
    rle = mask_utils.encode(binary)[0]
    dets = [
        {"image_id": 1, "category_id": 2, "bbox": [12, 12, 18, 18], "score": 0.8,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
        {"image_id": 1, "category_id": 3, "bbox": [40, 40, 10, 10], "score": 0.1,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
    ]  # fmt: skip
    (run / "coco_results.json").write_text(json.dumps(dets))
    path = report.coco_figure(tmp_path / "pred.png", root, {"distilled": run})
    assert path is not None and path.is_file()
    assert report.coco_figure(tmp_path / "none.png", root, {"distilled": tmp_path / "missing"}) is None


def test_report_does_not_import_the_demo() -> None:
    tree = ast.parse((REPO / "dreamteacher" / "report.py").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("dreamteacher.demo")}
    done = subprocess.run(
        [sys.executable, "-c", "import sys, dreamteacher.report; assert 'dreamteacher.demo' not in sys.modules"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
