"""Student + regressor (+ optional label head) as one module: what distillation trains."""

from __future__ import annotations

import torch
from torch import nn

from distill.regressor import FeatureRegressor
from teachers.base import level_name
from training.backbone import Backbone


class DistillNet(nn.Module):
    """``images -> {level: prediction}`` (and ``"logits"`` when a label head is configured)."""

    def __init__(
        self,
        student: Backbone,
        teacher_channels: dict[str, int],
        *,
        channels: int = 256,
        pool_scales: list[int] | None = None,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        names = [level_name(s) for s in student.strides]
        self.regressor = FeatureRegressor(
            student.channels,
            teacher_channels,
            names,
            channels=channels,
            pool_scales=pool_scales,
            extra_outputs=[names[0]] if num_classes > 0 else [],
        )
        # Mix distillation's logit head: a 1x1 conv on the regressor's finest FPN level (stride 4), where a
        # segmentation decoder would read. It is deliberately tiny, so the soft labels' semantics must be carried by
        # the backbone (+ FPN), and the backbone is what fine-tuning keeps (the paper distils into the backbone that
        # is fine-tuned later); the head and the regressor are dropped after distillation.
        self.label_head = nn.Conv2d(channels, num_classes, 1) if num_classes > 0 else None
        mean = torch.tensor(student.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(student.pretrained_cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("pixel_mean", mean.view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", std.view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, images_u8_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the student's input normalisation (timm's mean/std for the model)."""
        return (images_u8_BCHW.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.student(images_BCHW)
        pyramid = self.regressor.pyramid(feats)
        out = self.regressor.project(pyramid)
        if self.label_head is not None:
            out["logits"] = self.label_head(pyramid[self.regressor.level_names[0]])  # (B, K, H/4, W/4)
        return out
