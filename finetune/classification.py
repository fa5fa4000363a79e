"""Image classification on an ``imagefolder`` dataset: fine-tuning (``task: imagenet``) and the linear probe
(``task: linear``), both built from timm's own pieces (docs/finetune.md has the protocols and their sources).

* data: ``<root>/<train_split>/<class>/*`` and ``<root>/<val_split>/<class>/*`` (torchvision's folder scan),
  timm ``create_transform`` (train: RandomResizedCrop + flip [+ RandAugment]; test: resize + center crop);
* fine-tuning: ``timm.create_model(backbone, num_classes=K, drop_path_rate=...)`` with the distilled backbone
  loaded strictly (timm names; only the classifier is new), timm ``Mixup`` / CutMix, ``BinaryCrossEntropy`` /
  ``SoftTargetCrossEntropy`` / label smoothing, ``create_optimizer_v2``, ``create_scheduler_v2`` (cosine, per
  update), optional ``ModelEmaV3``;
* linear probe: frozen backbone (eval mode), global-average-pooled stride-32 features -> BatchNorm1d without
  affine -> Linear (MAE's head), only the head trained;
* evaluation: top-1 / top-5 over the val split, sharded over ranks, counts all-reduced.

Every augmentation is a function of the sample seed from :class:`StepBatchSampler` and Mixup of the step's seed
(``train_loop`` re-seeds numpy / Python / torch per step), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from finetune.config import ClassificationConfig, FinetuneConfig
from finetune.engine import resume_step, train_loop, unwrap
from finetune.report import write_summary
from sources.images import decode_rgb
from training.backbone import build_backbone
from training.checkpoint import load_checkpoint
from training.metrics import MetricsLog
from training.runtime import Runtime
from training.sampler import StepBatchSampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------
def find_classes(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} does not exist; expected the imagefolder layout <root>/{split}/<class>/*.JPEG "
            "(ImageNet's official val/ is flat: re-folder it by class, docs/finetune.md)"
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"{folder} has no class folders; expected <root>/{split}/<class>/*.JPEG (a flat ImageNet val/ must be "
            "re-foldered by class first, docs/finetune.md)"
        )
    return classes


def list_samples(root: Path, split: str, classes: list[str]) -> list[tuple[Path, int]]:
    """``(image, class index)`` sorted by class then file; a class folder unknown to ``classes`` is an error."""
    folder = root / split
    found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise ValueError(f"{folder} has classes not in the train split: {', '.join(unknown[:8])}")
    index = {c: i for i, c in enumerate(classes)}
    samples = [
        (path, index[c])
        for c in found
        for path in sorted((folder / c).iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not samples:
        flat = folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())
        if flat:
            raise ValueError(
                f"{folder} holds images but no class folders: the official ImageNet val layout; re-folder it "
                "into <class>/ sub-folders with the labels file first (docs/finetune.md)"
            )
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}/<class>/")
    return samples


class ClassFolder(Dataset):
    """Images of one split with a timm transform. Training items are ``(index, sample_seed)``: the RNGs the
    transform draws from (Python, numpy, torch) are seeded from the sample seed first."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        image = decode_rgb(path.read_bytes())
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return self.transform(image), label


def build_transforms(cc: ClassificationConfig, mean: tuple, std: tuple) -> tuple[Callable, Callable]:
    """timm's train (RandomResizedCrop, flip, RandAugment) and test (resize, center crop) transforms."""
    train = create_transform(
        cc.img_size,
        is_training=True,
        scale=tuple(cc.scale),
        hflip=cc.hflip,
        color_jitter=None,
        auto_augment=cc.auto_augment or None,
        interpolation=cc.interpolation,
        mean=mean,
        std=std,
    )
    test = create_transform(
        cc.img_size,
        is_training=False,
        crop_pct=cc.crop_pct,
        interpolation=cc.interpolation,
        mean=mean,
        std=std,
    )
    return train, test


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------
def build_classifier(name: str, num_classes: int, ckpt: str, drop_path: float) -> nn.Module:
    """timm classifier; the backbone from ``ckpt`` (strict: every non-classifier weight must load), head new."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path)
    if ckpt:
        weights = build_backbone(name, ckpt).timm_state_dict()
        # build_backbone checked the file strictly against the backbone; what the backbone lacks is the head
        _, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"{ckpt}: keys {unexpected[:8]} are not in timm model {name!r}")
    return model


class LinearProbe(nn.Module):
    """Frozen backbone -> global average pool of the stride-32 level -> BatchNorm1d (no affine) -> Linear.

    MAE's probe head (``torch.nn.BatchNorm1d(affine=False, eps=1e-6)`` before the linear layer, weights
    trunc-normal std 0.01). The backbone stays in eval mode (its BN statistics are not updated) and gets no
    gradient; only ``head`` is trained."""

    def __init__(self, name: str, num_classes: int, ckpt: str) -> None:
        super().__init__()
        self.backbone = build_backbone(name, ckpt)
        self.backbone.requires_grad_(False)
        channels = self.backbone.channels[-1]
        self.head = nn.Sequential(
            nn.BatchNorm1d(channels, affine=False, eps=1e-6), nn.Linear(channels, num_classes)
        )
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pooled_BC = self.backbone(images_B3HW)[-1].float().mean(dim=(2, 3))
        return self.head(pooled_BC)


def build_loss(cc: ClassificationConfig, mixing: bool) -> nn.Module:
    """The recipe's loss: BCE (RSB; soft or hard targets) or CE (soft with mixup, label smoothing, plain)."""
    if cc.loss == "bce":
        return BinaryCrossEntropy(smoothing=cc.smoothing, target_threshold=cc.bce_target_thresh or None)
    if mixing:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cc.smoothing) if cc.smoothing > 0 else nn.CrossEntropyLoss()


# ------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------
def topk_correct(
    logits_BK: torch.Tensor, labels_B: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> torch.Tensor:
    """How many samples have their label among the top-k logits, per k (k capped at the class count)."""
    top = logits_BK.topk(min(max(ks), logits_BK.shape[1]), dim=1).indices  # (B, kmax)
    hit_BK = top == labels_B[:, None]
    return torch.stack([hit_BK[:, : min(k, top.shape[1])].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: ClassFolder,
    runtime: Runtime,
    batch_size: int,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) over ``dataset``, each rank scoring every ``world_size``-th image."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, list(range(runtime.rank, len(dataset), runtime.world_size)))
    counts = torch.zeros(3, dtype=torch.int64, device=runtime.device)  # top-1, top-5, images
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, pin_memory=runtime.device.type == "cuda"
    )
    for images, labels in tqdm(loader, desc="eval", disable=not (progress and runtime.is_main)):
        images, labels = images.to(runtime.device), labels.to(runtime.device)
        if runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(images)
        counts[:2] += topk_correct(logits.float(), labels)
        counts[2] += len(labels)
    if runtime.distributed:
        dist.all_reduce(counts)
    total = max(int(counts[2]), 1)
    return {"top1": 100.0 * int(counts[0]) / total, "top5": 100.0 * int(counts[1]) / total, "images": total}


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------
def run_classification(
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
    """Fine-tune (``imagenet``) or linear-probe (``linear``) and evaluate top-1 / top-5; writes summary.md."""
    linear = cfg.task == "linear"
    cc = cfg.linear if linear else cfg.classify
    # 1. Data.
    classes = find_classes(root, cc.train_split)
    num_classes = cc.num_classes or len(classes)
    if num_classes < len(classes):
        raise ValueError(f"finetune.{cfg.task}: num_classes={num_classes} < {len(classes)} class folders")
    # 2. Model (its timm normalisation is the one distill used), optimizer, schedule.
    if linear:
        model = LinearProbe(cfg.backbone, num_classes, cfg.ckpt)
        trained, pretrained_cfg = model.head, model.backbone.pretrained_cfg
    else:
        model = build_classifier(cfg.backbone, num_classes, cfg.ckpt, cc.drop_path)
        trained, pretrained_cfg = model, model.pretrained_cfg
    train_tf, test_tf = build_transforms(cc, pretrained_cfg["mean"], pretrained_cfg["std"])
    train_set = ClassFolder(list_samples(root, cc.train_split, classes), train_tf)
    val_set = ClassFolder(list_samples(root, cc.val_split, classes), test_tf)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cc.optim
    lr = o.lr * cfg.batch_size / o.lr_base_size if o.lr_base_size else o.lr
    optimizer = create_optimizer_v2(
        trained, opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum
    )
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = cc.epochs * steps_per_epoch
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cc.epochs,
        warmup_epochs=o.warmup_epochs,
        warmup_lr=o.warmup_lr,
        min_lr=o.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    ema = ModelEmaV3(model, decay=cc.ema_decay) if cc.ema_decay > 0 else None
    checkpoint = out_dir / "checkpoint.pt"
    start = resume_step(checkpoint, model, optimizer, resume=resume, eval_only=eval_only)
    if ema is not None and start > 0:
        ema.module.load_state_dict(load_checkpoint(checkpoint)["ema"])
    train_model = runtime.wrap(model)
    on_start()
    log = MetricsLog(out_dir, enabled=runtime.is_main, resume_from=None if eval_only else start)
    eval_batch = max(1, min(256, cfg.batch_size // (runtime.world_size * cfg.accum_steps)))
    scored = (lambda: ema.module) if ema is not None else (lambda: model)

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_classifier(scored(), val_set, runtime, eval_batch, progress, cfg.num_workers)
        log.log(step, {"val/top1": metrics["top1"], "val/top5": metrics["top5"]})
        return metrics

    # 3. Train.
    mixing = cc.mixup > 0 or cc.cutmix > 0
    mixup = (
        Mixup(
            mixup_alpha=cc.mixup,
            cutmix_alpha=cc.cutmix,
            label_smoothing=cc.smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    criterion = build_loss(cc, mixing)

    def losses(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = (t.to(runtime.device, non_blocking=True) for t in batch)
        if mixup is not None:
            images, labels = mixup(images, labels)
        if runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"cls": criterion(m(images).float(), labels)}

    def schedule(step: int) -> float:
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

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
            repeats=cc.repeats,
        )
        loader = DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
        history = train_loop(
            model=train_model,
            compute_losses=losses,
            batches=iter(loader),
            optimizer=optimizer,
            optim_cfg=o,
            start=start,
            total=total,
            runtime=runtime,
            log=log,
            checkpoint=checkpoint,
            checkpoint_every=cfg.checkpoint_every,
            log_every=cfg.log_every,
            on_eval=evaluate,
            eval_every=cfg.eval_every,
            seed=cfg.seed,
            progress=progress,
            accum_steps=cfg.accum_steps,
            schedule=schedule,
            after_step=(lambda done: ema.update(unwrap(train_model), step=done)) if ema is not None else None,
            extra_state=(lambda: {"ema": ema.module.state_dict()}) if ema is not None else None,
        )
    # 4. Evaluate, report.
    steps = total if not eval_only else start
    final = evaluate(steps)
    log.close()
    result: dict[str, object] = {
        "top1": final["top1"],
        "top5": final["top5"],
        "val_images": final["images"],
        "steps": steps,
        "train_loss_first": history[0] if history else math.nan,
        "train_loss_last": history[-1] if history else math.nan,
    }
    if runtime.is_main:
        header = {
            "task": cfg.task,
            "backbone": cfg.backbone,
            "ckpt": cfg.ckpt or "random init",
            "steps": steps,
            "classes": num_classes,
            "val images": final["images"],
            "scored": "EMA weights" if ema is not None else "model",
        }
        title = f"{'Linear probe' if linear else 'Fine-tuning'} {cfg.exp}: {cfg.task}"
        write_summary(out_dir / "summary.md", title, header, {"top-1": final["top1"], "top-5": final["top5"]})
    return result
