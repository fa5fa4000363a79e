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
    """Student levels (fine -> coarse) -> one prediction per teacher level, keyed by level name.

    Only what the outputs use is built: a lateral for every level from the finest used one up (the top-down sum
    runs through them), a 3x3 output conv for each used level, a projection for each teacher level. With
    ``distill.levels: [s8, s16, s32]`` no stride-4 lateral or output conv exists, so every parameter gets a
    gradient and DDP (which runs without ``find_unused_parameters``) does not fail on its second step.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: dict[str, int],
        level_names: list[str],
        *,
        channels: int = 256,
        pool_scales: list[int] | None = None,
        extra_outputs: list[str] | None = None,
    ) -> None:
        """``in_channels``/``level_names`` per student level (fine -> coarse); ``out_channels``: teacher C per
        level name (a subset of ``level_names``: levels the bank lacks get no projection). ``extra_outputs``:
        levels whose FPN output is read without a projection (the label head reads the finest)."""
        super().__init__()
        if len(in_channels) != len(level_names):
            raise ValueError(f"{len(in_channels)} student levels but {len(level_names)} level names")
        used = set(out_channels) | set(extra_outputs or [])
        unknown = sorted(used - set(level_names))
        if unknown:
            raise ValueError(
                f"teacher level(s) {unknown} have no student level; student levels: {level_names}"
            )
        if not used:
            raise ValueError("the regressor has no output level; distill.levels selects none")
        self.level_names = list(level_names)
        self.first = min(level_names.index(name) for name in used)
        """Index of the finest level used; finer student levels are not read."""
        inner_names, inner_channels = level_names[self.first : -1], in_channels[self.first : -1]
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales or [1, 2, 3, 6])
        self.laterals = nn.ModuleDict(
            {name: conv_bn_relu(c, channels, 1) for name, c in zip(inner_names, inner_channels, strict=True)}
        )
        self.smooth = nn.ModuleDict(
            {name: conv_bn_relu(channels, channels, 3) for name in inner_names if name in used}
        )
        self.heads = nn.ModuleDict(
            {name: nn.Conv2d(channels, out_channels[name], 1) for name in out_channels}
        )

    def pyramid(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """FPN outputs of the used levels, ``{level: (B, channels, H_l, W_l)}``."""
        top_name = self.level_names[-1]
        inner = {
            name: self.laterals[name](f)
            for name, f in zip(self.level_names, feats, strict=True)
            if name in self.laterals
        }
        inner[top_name] = self.ppm(feats[-1])
        # top-down: add the upsampled coarser level to each lateral (coarse -> fine)
        names = self.level_names[self.first :]
        for finer, coarser in zip(reversed(names[:-1]), reversed(names[1:]), strict=True):
            inner[finer] = inner[finer] + F.interpolate(
                inner[coarser], size=inner[finer].shape[-2:], mode="bilinear", align_corners=False
            )
        out = {name: self.smooth[name](inner[name]) for name in names[:-1] if name in self.smooth}
        out[top_name] = inner[top_name]  # the PPM output is the top level as is (UperNet)
        return out

    def project(self, pyramid: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FPN outputs -> ``{level: (B, C_teacher, H_l, W_l)}`` for the levels that have a teacher target."""
        return {name: head(pyramid[name]) for name, head in self.heads.items()}

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.project(self.pyramid(feats))
