"""The paper's feature regressor: PPM on the last student level + FPN top-down path, then 1x1 to teacher channels.

Layout follows UperNet's head (which is what "FPN + PPM" means in the paper's ablation): the PPM output is the
top FPN level, lateral 1x1 convs and 3x3 output convs each carry BN + ReLU, all at ``channels`` (256) wide.
Each FPN output is projected by its own 1x1 conv (with bias) to the channel count of the teacher level it
reproduces. Written here rather than taken from mmseg (not a dependency) because the per-level projection heads
are specific to distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.blocks import PyramidPooling, conv_bn_relu


class FeatureRegressor(nn.Module):
    """Student levels (fine -> coarse) -> one prediction per teacher level, keyed by level name."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: dict[str, int],
        level_names: list[str],
        *,
        channels: int = 256,
        pool_scales: list[int] | None = None,
    ) -> None:
        """``in_channels``/``level_names`` per student level (fine -> coarse); ``out_channels``: teacher C per
        level name (a subset of ``level_names``: levels the bank lacks get no projection)."""
        super().__init__()
        if len(in_channels) != len(level_names):
            raise ValueError(f"{len(in_channels)} student levels but {len(level_names)} level names")
        unknown = sorted(set(out_channels) - set(level_names))
        if unknown:
            raise ValueError(
                f"teacher level(s) {unknown} have no student level; student levels: {level_names}"
            )
        self.level_names = list(level_names)
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales or [1, 2, 3, 6])
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.heads = nn.ModuleDict(
            {name: nn.Conv2d(channels, out_channels[name], 1) for name in out_channels}
        )

    def pyramid(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """FPN outputs, fine -> coarse, each ``(B, channels, H_l, W_l)``."""
        top = self.ppm(feats[-1])
        inner = [lateral(f) for lateral, f in zip(self.laterals, feats[:-1], strict=True)] + [top]
        # top-down: add the upsampled coarser level to each lateral
        for i in range(len(inner) - 2, -1, -1):
            inner[i] = inner[i] + F.interpolate(
                inner[i + 1], size=inner[i].shape[-2:], mode="bilinear", align_corners=False
            )
        return [smooth(x) for smooth, x in zip(self.smooth, inner[:-1], strict=True)] + [inner[-1]]

    def project(self, pyramid: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """FPN outputs -> ``{level: (B, C_teacher, H_l, W_l)}`` for the levels that have a teacher target."""
        return {
            name: self.heads[name](p)
            for name, p in zip(self.level_names, pyramid, strict=True)
            if name in self.heads
        }

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.project(self.pyramid(feats))
