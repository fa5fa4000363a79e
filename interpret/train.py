"""Training and scoring the feature interpreter on a few labelled images (the paper's recipe, docs/interpreter.md).

Features come from the bank's own read-out (teacher, taps, T, resolution: the bank's recorded provenance), with
fresh noise per image and epoch (``teachers.encoding.fresh_seed``), so the interpreter sees the distribution of
stochastic encodings the bank's rows were drawn from. AdamW (lr 4e-3, wd 0.05, betas 0.9/0.95), CE + 3 Dice,
100 epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from interpret.config import InterpretConfig
from teachers.interpreter import FeatureInterpreter, interpreter_loss
from training.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from training.metrics import MetricsLog
from training.seg_metrics import ConfusionMatrix

log = logging.getLogger(__name__)

Features = Callable[[torch.Tensor, list[str], list[int], int], dict[str, torch.Tensor]]
"""(images_u8_BCHW already flipped, keys, flips, visit) -> {level: feats_BCHW float32 on the device}."""


@dataclass(frozen=True)
class LabelledSet:
    """Few-label images at the bank's resolution with their class maps."""

    keys: list[str]
    images_u8: torch.Tensor
    """(N, 3, R, R) uint8, prepared like the bank's pixels (``sources.images.center_crop_resize``)."""
    labels: torch.Tensor
    """(N, R, R) int64 class ids, 255 = ignore."""


def load_labelled(root: Path, split: str, resolution: int, num_classes: int) -> LabelledSet:
    """The ``split`` of a few-label layout, images and labels brought to ``resolution`` by the bank's geometry."""
    from PIL import Image

    from sources.images import center_crop_resize
    from sources.segmentation import center_crop_resize_label, fewshot_pairs, load_pair

    keys, images, labels = [], [], []
    for pair in fewshot_pairs(root, split):
        image_CHW, label_HW = load_pair(pair, num_classes, reduce_zero_label=False)
        pil = Image.fromarray(image_CHW.permute(1, 2, 0).to(torch.uint8).numpy())
        images.append(torch.from_numpy(center_crop_resize(pil, resolution)))
        labels.append(torch.from_numpy(center_crop_resize_label(label_HW.numpy(), resolution)))
        keys.append(f"{split}/{pair.image.stem}")
    return LabelledSet(keys, torch.stack(images), torch.stack(labels))


def flip_views(
    images_u8: torch.Tensor, labels: torch.Tensor, flips: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror (along W) the images and labels of the rows with ``flips[i] == 1``."""
    mask = torch.tensor(flips, dtype=torch.bool)
    if not mask.any():
        return images_u8, labels
    return (
        torch.where(mask[:, None, None, None], images_u8.flip(-1), images_u8),
        torch.where(mask[:, None, None], labels.flip(-1), labels),
    )


def build_optimizer(model: FeatureInterpreter, cfg: InterpretConfig) -> torch.optim.Optimizer:
    """AdamW; norms and biases without weight decay (timm's rule, as in distill)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model,
        opt="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas),
        filter_bias_and_bn=True,
    )


def train_interpreter(
    model: FeatureInterpreter,
    features: Features,
    data: LabelledSet,
    cfg: InterpretConfig,
    run_dir: Path,
    *,
    device: torch.device,
    progress: bool = True,
) -> dict[str, float]:
    """``cfg.epochs`` epochs over ``data``; resumes from ``run_dir/checkpoint.pt``. Returns the last epoch's
    mean loss terms. Each epoch draws its own image order and flips from (seed, epoch), and the teacher's noise
    from (seed, key, epoch, flip), so a resumed run repeats an uninterrupted one's epochs."""
    optimizer = build_optimizer(model, cfg)
    ckpt_path = run_dir / CHECKPOINT_NAME
    start = 0
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        log.info("interpreter: resumed %s at epoch %d", run_dir, start)
    metrics = MetricsLog(run_dir, tensorboard=False, resume_from=start)
    n = len(data.keys)
    last: dict[str, float] = {}
    bar = tqdm(total=cfg.epochs, initial=start, desc="interpret: train", disable=not progress)
    for epoch in range(start, cfg.epochs):
        model.train()
        # 1. this epoch's order and flips, from (seed, epoch) alone
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(n).tolist()
        flips = (rng.random(n) < 0.5).astype(int).tolist() if cfg.flip else [0] * n
        sums: dict[str, float] = {}
        for begin in range(0, n, cfg.batch_size):
            idx = order[begin : begin + cfg.batch_size]
            batch_flips = [flips[i] for i in idx]
            images_u8, labels = flip_views(data.images_u8[idx], data.labels[idx], batch_flips)
            # 2. the teacher's features of these views, fresh noise (no gradient into the teacher)
            feats = features(images_u8, [data.keys[i] for i in idx], batch_flips, epoch)
            # 3. interpreter, CE + Dice, AdamW step
            terms = interpreter_loss(model(feats), labels.to(device), dice_weight=cfg.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * len(idx)
        last = {key: value / n for key, value in sums.items()}
        if not all(np.isfinite(v) for v in last.values()):
            raise FloatingPointError(f"interpreter epoch {epoch}: non-finite loss {last}; lower interpret.lr")
        metrics.log(epoch + 1, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
            save_checkpoint(
                ckpt_path,
                {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
            )
    bar.close()
    metrics.close()
    return last


@torch.no_grad()
def evaluate_interpreter(
    model: FeatureInterpreter,
    features: Features,
    data: LabelledSet,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Test mIoU (mmseg's definitions, ``training.seg_metrics``) at the bank's resolution, one noise draw per
    image (visit -1: a draw no training epoch used), unflipped."""
    model.eval()
    matrix = ConfusionMatrix(model.cfg.num_classes, device)
    for begin in range(0, len(data.keys), batch_size):
        keys = data.keys[begin : begin + batch_size]
        feats = features(data.images_u8[begin : begin + batch_size], keys, [0] * len(keys), -1)
        logits_BKhw = model(feats)
        labels = data.labels[begin : begin + batch_size].to(device)
        logits_BKHW = torch.nn.functional.interpolate(
            logits_BKhw, size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        matrix.update(logits_BKHW.argmax(dim=1), labels)
    return matrix.compute()
