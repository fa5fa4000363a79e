"""COCO instance segmentation fine-tuning: Mask R-CNN (timm backbone + FPN) train / eval with COCOeval."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune.coco import CocoInstances, collate, evaluate_coco, to_coco_results, write_results
from finetune.config import FinetuneConfig
from finetune.engine import resume_step, train_loop, unwrap
from finetune.heads.maskrcnn import build_mask_rcnn
from finetune.optim import build_optimizer
from finetune.report import palette, save_panels, write_summary
from training.backbone import apply_norm, build_backbone
from training.metrics import MetricsLog
from training.runtime import Runtime
from training.sampler import StepBatchSampler

SCHEDULE_EPOCHS = {"1x": 12, "2x": 24}


def total_steps(schedule: str, iters: int, num_images: int, batch_size: int) -> int:
    """``iters`` if set, else the named schedule's epochs over the training images."""
    if schedule not in SCHEDULE_EPOCHS:
        raise ValueError(f"finetune.detection.schedule={schedule!r}; choices: {', '.join(SCHEDULE_EPOCHS)}")
    return iters if iters > 0 else math.ceil(SCHEDULE_EPOCHS[schedule] * num_images / batch_size)


def det_losses(model: nn.Module, batch, runtime: Runtime) -> dict[str, torch.Tensor]:
    images, targets = batch
    images = [im.to(runtime.device, non_blocking=True) for im in images]
    targets = [{k: v.to(runtime.device, non_blocking=True) for k, v in t.items()} for t in targets]
    return model(
        images, targets
    )  # loss_classifier, loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg


@torch.no_grad()
def predict_coco(model: nn.Module, dataset: CocoInstances, runtime: Runtime, batch_size: int, progress: bool):
    """This rank's share of COCO results, plus raw outputs of its first few images for the figure."""
    net = unwrap(model)
    net.eval()
    indices = list(range(runtime.rank, len(dataset), runtime.world_size))
    results, kept = [], {}
    for start in tqdm(
        range(0, len(indices), batch_size), desc="eval", disable=not (progress and runtime.is_main)
    ):
        chunk = indices[start : start + batch_size]
        images, targets = collate([dataset[i] for i in chunk])
        with runtime.autocast():
            outputs = net([im.to(runtime.device) for im in images])
        image_ids = [int(t["image_id"]) for t in targets]
        results += to_coco_results(outputs, image_ids, dataset.cat_ids)
        for i, output in zip(chunk, outputs, strict=False):
            if i < 8:
                kept[i] = {k: v.float().cpu() for k, v in output.items()}
    return results, kept


def _instance_map(masks_NHW: np.ndarray, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Paint instances (later over earlier) as class ids; -1 = background."""
    canvas = np.full((height, width), -1, np.int64)
    for mask, label in zip(masks_NHW, labels, strict=False):
        canvas[mask > 0.5] = label - 1
    return canvas


def _panels(dataset: CocoInstances, kept: dict[int, dict[str, torch.Tensor]], count: int, score: float = 0.5):
    colours = palette(len(dataset.cat_ids))
    rows = []
    for i in sorted(kept)[:count]:
        image, target = dataset[i]
        height, width = image.shape[-2:]
        out = kept[i]
        confident = out["scores"] >= score
        gt = _instance_map(target["masks"].numpy(), target["labels"].numpy(), height, width)
        pred = _instance_map(
            out["masks"][confident, 0].numpy(), out["labels"][confident].numpy(), height, width
        )
        picture = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        rows.append((picture, colours[gt], colours[pred]))
    return rows


def run_detection(
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
    """Train (unless ``eval_only``) and evaluate Mask R-CNN; writes coco_results.json, summary.md, predictions.png."""
    det = cfg.detection
    # 1. Data and model.
    train_set = CocoInstances(
        root, "train", train=True, flip_prob=det.flip_prob, filter_empty=det.filter_empty_train
    )
    val_set = CocoInstances(root, "val", train=False)
    backbone = apply_norm(build_backbone(cfg.backbone, cfg.ckpt), det.norm, runtime.sync_batchnorm)
    model = build_mask_rcnn(backbone, len(train_set.cat_ids), det).to(runtime.device)
    optimizer = build_optimizer(model, det.optim)
    checkpoint = out_dir / "checkpoint.pt"
    start = resume_step(checkpoint, model, optimizer, resume=resume, eval_only=eval_only)
    total = total_steps(det.schedule, det.iters, len(train_set), cfg.batch_size)
    train_model = runtime.wrap(model)
    on_start()  # data, model and checkpoint are in place: the run starts (config.yaml is written now)
    # training drops records written after its start step (by a run that died); --eval-only appends its record
    log = MetricsLog(out_dir, enabled=runtime.is_main, resume_from=None if eval_only else start)
    per_rank_batch = max(1, cfg.batch_size // runtime.world_size)

    def evaluate(step: int) -> tuple[dict[str, float | None], dict]:
        # Each rank writes its share; rank 0 merges the files (no pickled all_gather).
        results, kept = predict_coco(model, val_set, runtime, per_rank_batch, progress)
        write_results(out_dir / f"coco_results.rank{runtime.rank}.json", results)
        runtime.barrier()
        metrics: dict[str, float | None] = {}
        if runtime.is_main:
            merged = []
            for rank in range(runtime.world_size):
                part = out_dir / f"coco_results.rank{rank}.json"
                merged += json.loads(part.read_text())
                part.unlink()
            write_results(out_dir / "coco_results.json", merged)
            metrics = evaluate_coco(val_set.coco, merged)
            log.log(step, {f"val/{k}": v for k, v in metrics.items() if v is not None})
        runtime.barrier()
        return metrics, kept

    # 2. Train.
    history: list[float] = []
    if not eval_only and start < total:
        sampler = StepBatchSampler(
            len(train_set),
            cfg.batch_size,
            total,
            start,
            cfg.seed,
            runtime.rank,
            runtime.world_size,
            key="finetune.batch_size",
        )
        loader = DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            pin_memory=runtime.device.type == "cuda",
        )
        history = train_loop(
            model=train_model,
            compute_losses=lambda m, b: det_losses(m, b, runtime),
            batches=iter(loader),
            optimizer=optimizer,
            optim_cfg=det.optim,
            start=start,
            total=total,
            runtime=runtime,
            log=log,
            checkpoint=checkpoint,
            checkpoint_every=cfg.checkpoint_every,
            log_every=cfg.log_every,
            on_eval=lambda step: evaluate(step),
            eval_every=cfg.eval_every,
            seed=cfg.seed,
            accum_steps=cfg.accum_steps,
            progress=progress,
        )
    # 3. Evaluate, report.
    steps = start if eval_only else total
    metrics, kept = evaluate(steps)
    log.close()
    result: dict[str, object] = {
        **metrics,
        "steps": steps,
        "train_images": len(train_set),
        "train_loss_first": history[0] if history else math.nan,
        "train_loss_last": history[-1] if history else math.nan,
    }
    if runtime.is_main:
        header = {
            "task": "coco",
            "backbone": cfg.backbone,
            "ckpt": cfg.ckpt or "random init",
            "steps": steps,
            "schedule": det.schedule if det.iters == 0 else f"{det.iters} steps",
            "val images": len(val_set),
        }
        write_summary(out_dir / "summary.md", f"Fine-tuning {cfg.exp}: coco", header, metrics)
        save_panels(
            out_dir / "predictions.png",
            _panels(val_set, kept, cfg.vis_samples),
            ("image", "ground truth", "prediction (score >= 0.5)"),
        )
    return result
