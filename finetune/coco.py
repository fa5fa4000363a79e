"""COCO instance segmentation in the official layout, and its evaluation with pycocotools.

``<root>/{train2017,val2017}/*.jpg`` and ``<root>/annotations/instances_{train,val}2017.json``. Category ids map
to contiguous labels 1..K (0 = background) in the order of ``categories``. Training ignores crowd annotations
(``iscrowd=1``) and degenerate boxes (as torchvision's reference and detectron2 do); with
``filter_empty_train`` images left without instances are dropped from training. Evaluation keeps every image;
COCOeval itself treats crowd regions as "ignore".
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset

from sources.images import to_rgb

SPLITS = {"train": "train2017", "val": "val2017"}
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_paths(root: Path, split: str) -> tuple[Path, Path]:
    if split not in SPLITS:
        raise ValueError(f"COCO split {split!r}; choices: {', '.join(SPLITS)}")
    image_dir, ann_file = root / SPLITS[split], root / "annotations" / f"instances_{SPLITS[split]}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file {ann_file} is missing (official layout: annotations/)")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {image_dir} is missing")
    return image_dir, ann_file


def load_coco(ann_file: Path) -> COCO:
    """pycocotools COCO index, quietly, with category ids checked."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    known = set(coco.getCatIds())
    for ann in coco.dataset.get("annotations", []):
        if ann["category_id"] not in known:
            raise ValueError(
                f"{ann_file}: annotation {ann['id']} has category_id {ann['category_id']}, which is not in "
                f"'categories' ({sorted(known)})"
            )
    return coco


class CocoInstances(Dataset):
    """Images with Mask R-CNN targets: image (3, H, W) float 0..1; boxes (N, 4) xyxy, labels (N,), masks (N, H, W)."""

    def __init__(
        self, root: Path, split: str, *, train: bool, flip_prob: float = 0.5, filter_empty: bool = True
    ):
        self.image_dir, self.ann_file = coco_paths(root, split)
        self.coco = load_coco(self.ann_file)
        self.train, self.flip_prob = train, flip_prob
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {cat: i + 1 for i, cat in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.getImgIds())
        if train and filter_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        if not ids:
            raise ValueError(
                f"{self.ann_file}: no usable images (filter_empty_train drops images without instances)"
            )
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def _image(self, image_id: int) -> torch.Tensor:
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (id {image_id} in {self.ann_file}) is missing")
        with Image.open(path) as im:
            array = np.asarray(to_rgb(im), dtype=np.uint8).copy()  # 16-bit, alpha, CMYK: sources.images rules
        if array.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"image {path} is {array.shape[1]}x{array.shape[0]} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (WxH); the masks would not line up"
            )
        return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        image_id = self.ids[index]
        image = self._image(image_id)
        height, width = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes, labels, masks = [], [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue  # degenerate box
            boxes.append([x0, y0, x1, y1])
            labels.append(self.cat_to_label[ann["category_id"]])
            masks.append(self.coco.annToMask(ann))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros(0, height, width, dtype=torch.uint8),
            "image_id": torch.tensor(image_id),
        }
        if self.train and np.random.default_rng([seed, index]).uniform() < self.flip_prob:
            image = image.flip(-1)
            target["masks"] = target["masks"].flip(-1)
            target["boxes"] = torch.stack(
                [
                    width - target["boxes"][:, 2],
                    target["boxes"][:, 1],
                    width - target["boxes"][:, 0],
                    target["boxes"][:, 3],
                ],
                dim=1,
            )
        return image, target


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    images, targets = zip(*batch, strict=False)
    return list(images), list(targets)


def to_coco_results(
    outputs: list[dict[str, torch.Tensor]],
    image_ids: list[int],
    label_to_cat: list[int],
    mask_threshold: float = 0.5,
) -> list[dict[str, object]]:
    """Mask R-CNN outputs (boxes xyxy, labels 1..K, scores, masks (N, 1, H, W) probabilities) -> COCO results
    (one entry per detection with ``bbox`` xywh and ``segmentation`` as compressed RLE)."""
    results = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().float().cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        binary = (output["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        for box, label, score, rle in zip(
            xywh, output["labels"].tolist(), output["scores"].tolist(), rles, strict=False
        ):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label_to_cat[label - 1]),
                    "bbox": [round(v, 3) for v in box],
                    "score": float(score),
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                }
            )
    return results


def evaluate_coco(coco_gt: COCO, results: list[dict[str, object]]) -> dict[str, float | None]:
    """COCOeval bbox and segm -> ``bbox_AP`` ... ``segm_APl`` in percent (None where COCOeval gives -1).

    For segm the boxes are dropped, so that instance areas (small / medium / large) are mask areas (detectron2
    does the same); with no detections every AP is 0.
    """
    metrics: dict[str, float | None] = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in METRIC_NAMES})
            continue
        dets = [dict(r) for r in results]
        if iou_type == "segm":
            for det in dets:
                det.pop("bbox", None)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(dets)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(METRIC_NAMES, evaluator.stats[:6], strict=False):
            metrics[f"{iou_type}_{name}"] = None if value < 0 else 100.0 * float(value)
    return metrics


def write_results(path: Path, results: list[dict[str, object]]) -> None:
    path.write_text(json.dumps(results))
