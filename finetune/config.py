"""Finetune stage config (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class FinetuneConfig:
    """``dreamteacher finetune``: one downstream run."""

    task: Literal["ade20k", "coco", "fewshot"] = "ade20k"
    data: str = "ade20k"
    """Name in ``datasets:`` (layout must match the task)."""
    backbone: str = "resnet50"
    """timm model name of the backbone."""
    ckpt: str = ""
    """Backbone weights (safetensors from distill); empty = random init."""
    exp: str = "default"
    out: str = "runs/finetune"
    seed: int = 0
    device: str = "auto"
    extra: dict[str, float] = field(default_factory=dict)
