"""Optimizer and learning-rate schedule (stateless function of the step, so resume needs only the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; 1-D parameters (norm weights, biases) get no weight decay (mmseg / detectron2 practice).

    The fused kernels (one pass over all tensors) are used where torch has them: on CPU, where torch otherwise
    loops over the tensors one at a time, fused AdamW is ~4x faster (a ResNet-18 step: 36 -> 9.5 ms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    builders = {
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused),
        "sgd": lambda: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused),
    }
    if cfg.name not in builders:
        raise ValueError(f"optimizer {cfg.name!r}; choices: {', '.join(builders)}")
    return builders[cfg.name]()


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: (poly | step decay) x linear warm-up (mmcv's warm-up form)."""
    progress = min(step, total) / max(total, 1)
    if cfg.schedule == "poly":
        floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        factor = (1.0 - progress) ** cfg.poly_power * (1.0 - floor) + floor
    elif cfg.schedule == "step":
        passed = sum(step >= math.floor(m * total) for m in cfg.milestones)
        factor = cfg.gamma**passed
    else:
        raise ValueError(f"lr schedule {cfg.schedule!r}; choices: poly, step")
    if step < cfg.warmup_iters:
        factor *= 1.0 - (1.0 - step / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
    return factor


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, cfg: OptimConfig) -> float:
    lr = cfg.lr * lr_factor(step, total, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
