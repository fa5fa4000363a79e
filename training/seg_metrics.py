"""Semantic-segmentation metrics from a confusion matrix (mmsegmentation's definitions).

aAcc = correct / labelled pixels; per class c: IoU = TP / (TP + FP + FN), Acc = TP / (TP + FN); mIoU and mAcc
average over the classes where they are defined (0/0 -> NaN, skipped, as mmseg's nanmean; a class only predicted
has IoU 0 and counts).
Why not torchmetrics: it is not a dependency, and mmseg's NaN-for-absent-class convention matters for comparison.
"""

from __future__ import annotations

import math

import torch


class ConfusionMatrix:
    """Accumulates a (K, K) matrix ``[ground truth, prediction]`` over labelled pixels (255 = ignore)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred_HW: torch.Tensor, label_HW: torch.Tensor) -> None:
        """Add one or more images (any matching shapes) of predicted and true class ids."""
        if pred_HW.shape != label_HW.shape:
            raise ValueError(
                f"prediction {tuple(pred_HW.shape)} and label {tuple(label_HW.shape)} differ in shape"
            )
        k = self.num_classes
        valid = label_HW != 255
        gt, pred = label_HW[valid].long(), pred_HW[valid].long()
        if gt.numel() and (int(gt.max()) >= k or int(gt.min()) < 0):
            raise ValueError(f"label value {int(gt.max())} outside 0..{k - 1} (and 255 = ignore)")
        self.matrix += torch.bincount(gt * k + pred, minlength=k * k).reshape(k, k).to(self.matrix.device)

    def compute(self) -> dict[str, object]:
        """Percentages: ``mIoU``, ``mAcc``, ``aAcc`` and per-class ``IoU`` / ``Acc`` lists (NaN = absent class)."""
        m = self.matrix.double()
        tp = m.diag()
        gt_total, pred_total = m.sum(1), m.sum(0)
        iou = tp / (gt_total + pred_total - tp)  # NaN where the class is in neither
        acc = tp / gt_total  # NaN where the class is absent from the ground truth
        return {
            "aAcc": 100.0 * float(tp.sum() / m.sum().clamp(min=1)),
            "mIoU": 100.0 * float(iou.nanmean()),
            "mAcc": 100.0 * float(acc.nanmean()),
            "IoU": [100.0 * float(v) for v in iou],
            "Acc": [100.0 * float(v) for v in acc],
        }


def per_class_table(metrics: dict[str, object], class_names: list[str]) -> str:
    """Markdown table of per-class IoU / Acc (absent classes shown as n/a)."""
    rows = ["| class | IoU | Acc |", "|---|---|---|"]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"], strict=False):
        cells = ["n/a" if math.isnan(v) else f"{v:.2f}" for v in (iou, acc)]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)
