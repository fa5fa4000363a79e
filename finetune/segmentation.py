"""Semantic segmentation fine-tuning (ADE20K and the label-efficient sets): UperNet train / eval."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.ade20k import ade20k_class_names, ade20k_pairs
from finetune.config import FinetuneConfig, SegEvalConfig
from finetune.engine import resume_step, train_loop, unwrap
from finetune.heads.upernet import UperNet
from finetune.optim import build_optimizer
from finetune.report import colourise, palette, save_panels, write_summary
from finetune.seg_data import SegmentationDataset
from sources.segmentation import fewshot_class_names, fewshot_pairs, read_image
from training.backbone import apply_norm, build_backbone
from training.metrics import MetricsLog
from training.runtime import Runtime
from training.sampler import StepBatchSampler
from training.seg_metrics import ConfusionMatrix, per_class_table


@dataclass
class SegData:
    train: SegmentationDataset
    val: SegmentationDataset
    class_names: list[str]


def build_seg_data(task: str, root: Path, cfg: FinetuneConfig) -> SegData:
    """ADE20K (train/val, reduce-zero-label) or a label-efficient set (train/test, labels as stored)."""
    seg = cfg.segmentation
    layouts = {
        "ade20k": (ade20k_pairs, ade20k_class_names, ("train", "val"), True),
        "fewshot": (fewshot_pairs, fewshot_class_names, ("train", "test"), False),
    }
    if task not in layouts:
        raise ValueError(f"segmentation task {task!r}; choices: {', '.join(layouts)}")
    find_pairs, find_names, (train_split, val_split), reduce_zero = layouts[task]
    names = find_names(root, seg.num_classes)
    common = {"num_classes": len(names), "aug": seg.aug, "reduce_zero_label": reduce_zero}
    train = SegmentationDataset(find_pairs(root, train_split), train=True, **common)
    val = SegmentationDataset(find_pairs(root, val_split), train=False, **common)
    return SegData(train, val, names)


def seg_losses(model: nn.Module, batch: dict[str, torch.Tensor], runtime: Runtime) -> dict[str, torch.Tensor]:
    images = batch["image"].to(runtime.device, non_blocking=True)  # (B, 3, crop, crop)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = batch["label"].to(runtime.device, non_blocking=True)  # (B, crop, crop)
    return unwrap(model).loss(model(images), labels)


@torch.no_grad()
def infer_logits(model: UperNet, image_13HW: torch.Tensor, cfg: SegEvalConfig) -> torch.Tensor:
    """Single-scale logits (1, K, H, W): one forward (whole) or averaged overlapping windows (slide, mmseg)."""
    if cfg.mode == "whole":
        return model(image_13HW)["logits"]
    _, _, height, width = image_13HW.shape
    crop, stride = cfg.crop_size, cfg.stride
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    logits = image_13HW.new_zeros(1, model.num_classes, height, width)
    counts = image_13HW.new_zeros(1, 1, height, width)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, max(height - crop, 0)), min(c * stride, max(width - crop, 0))
            y2, x2 = min(y1 + crop, height), min(x1 + crop, width)
            logits[:, :, y1:y2, x1:x2] += model(image_13HW[:, :, y1:y2, x1:x2])["logits"]
            counts[:, :, y1:y2, x1:x2] += 1
    return logits / counts


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    dataset: SegmentationDataset,
    cfg: SegEvalConfig,
    runtime: Runtime,
    progress: bool = True,
) -> tuple[dict[str, object], dict[int, np.ndarray]]:
    """mIoU / mAcc / aAcc over ``dataset`` (sharded across ranks); also returns predictions of the first images."""
    net = unwrap(model)
    net.eval()
    confusion = ConfusionMatrix(net.num_classes, runtime.device)
    predictions: dict[int, np.ndarray] = {}
    indices = list(range(runtime.rank, len(dataset), runtime.world_size))
    for i in tqdm(indices, desc="eval", disable=not (progress and runtime.is_main), dynamic_ncols=True):
        sample = dataset[i]
        image = sample["image"][None].to(runtime.device)  # (1, 3, h, w) resized to the eval bound
        label = sample["label"].to(runtime.device)  # (H, W) original resolution
        with runtime.autocast():
            logits = infer_logits(net, image, cfg)
        logits = nn.functional.interpolate(
            logits.float(), size=label.shape, mode="bilinear", align_corners=False
        )
        pred = logits.argmax(1)[0]  # (H, W)
        confusion.update(pred, label)
        if i < 8:
            predictions[i] = pred.cpu().numpy()
    if runtime.distributed:
        dist.all_reduce(confusion.matrix)
    return confusion.compute(), predictions


def _panels(dataset: SegmentationDataset, predictions: dict[int, np.ndarray], count: int, num_classes: int):
    colours = palette(num_classes)
    rows = []
    for i in sorted(predictions)[:count]:
        pair = dataset.pairs[i]
        image = read_image(pair.image).permute(1, 2, 0).byte().numpy()
        label = dataset[i]["label"].numpy()
        rows.append((image, colourise(label, colours), colourise(predictions[i], colours)))
    return rows


def run_segmentation(
    cfg: FinetuneConfig,
    root: Path,
    out_dir: Path,
    runtime: Runtime,
    *,
    resume: bool,
    eval_only: bool,
    progress: bool,
    on_start: Callable[[], None] = lambda: None,
) -> dict[str, object]:
    """Train (unless ``eval_only``) and evaluate UperNet; writes summary.md and predictions.png."""
    seg = cfg.segmentation
    # 1. Data and model.
    data = build_seg_data(cfg.task, root, cfg)
    num_classes = len(data.class_names)
    backbone = build_backbone(cfg.backbone, cfg.ckpt)
    if seg.norm == "frozen":
        backbone = apply_norm(backbone, "frozen", runtime.sync_batchnorm)
    model = UperNet(backbone, num_classes, seg.head)
    if seg.norm == "sync":  # mmseg: SyncBN in backbone and heads
        model = apply_norm(model, "sync", runtime.sync_batchnorm)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, seg.optim)
    checkpoint = out_dir / "checkpoint.pt"
    start = resume_step(checkpoint, model, optimizer, resume=resume, eval_only=eval_only)
    train_model = runtime.wrap(model)
    on_start()  # data, model and checkpoint are in place: the run starts (config.yaml is written now)
    # training drops records written after its start step (by a run that died); --eval-only appends its record
    log = MetricsLog(out_dir, enabled=runtime.is_main, resume_from=None if eval_only else start)

    def evaluate(step: int) -> dict[str, object]:
        metrics, predictions = evaluate_segmentation(model, data.val, seg.eval, runtime, progress)
        log.log(step, {f"val/{k}": metrics[k] for k in ("mIoU", "mAcc", "aAcc")})
        return metrics | {"_predictions": predictions}

    # 2. Train.
    history: list[float] = []
    if not eval_only and start < seg.iters:
        sampler = StepBatchSampler(
            len(data.train),
            cfg.batch_size,
            seg.iters,
            start,
            cfg.seed,
            runtime.rank,
            runtime.world_size,
            key="finetune.batch_size",
        )
        loader = DataLoader(
            data.train,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=runtime.device.type == "cuda",
            persistent_workers=False,
        )
        history = train_loop(
            model=train_model,
            compute_losses=lambda m, b: seg_losses(m, b, runtime),
            batches=iter(loader),
            optimizer=optimizer,
            optim_cfg=seg.optim,
            start=start,
            total=seg.iters,
            runtime=runtime,
            log=log,
            checkpoint=checkpoint,
            checkpoint_every=cfg.checkpoint_every,
            log_every=cfg.log_every,
            on_eval=evaluate,
            eval_every=cfg.eval_every,
            seed=cfg.seed,
            accum_steps=cfg.accum_steps,
            progress=progress,
        )
    # 3. Evaluate, report.
    final = evaluate(seg.iters if not eval_only else start)
    predictions = final.pop("_predictions")
    log.close()
    headline = {k: float(final[k]) for k in ("mIoU", "mAcc", "aAcc")}
    result: dict[str, object] = {
        **headline,
        "per_class": {
            name: {"IoU": iou, "Acc": acc}
            for name, iou, acc in zip(data.class_names, final["IoU"], final["Acc"], strict=False)
        },
        "steps": seg.iters if not eval_only else start,
        "train_loss_first": history[0] if history else math.nan,
        "train_loss_last": history[-1] if history else math.nan,
    }
    if runtime.is_main:
        header = {
            "task": cfg.task,
            "backbone": cfg.backbone,
            "ckpt": cfg.ckpt or "random init",
            "steps": result["steps"],
            "val images": len(data.val),
        }
        write_summary(
            out_dir / "summary.md",
            f"Fine-tuning {cfg.exp}: {cfg.task}",
            header,
            headline,
            per_class_table(final, data.class_names),
        )
        rows = _panels(data.val, predictions, cfg.vis_samples, num_classes)
        save_panels(out_dir / "predictions.png", rows, ("image", "ground truth", "prediction"))
    return result
