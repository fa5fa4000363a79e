"""Conv blocks shared by the heads that read a backbone pyramid (distill's regressor, finetune's UperNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    """``kernel`` x ``kernel`` conv (same padding, no bias: BN follows) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling as UperNet uses it: average-pool to each scale, 1x1 conv-BN-ReLU, upsample back
    (bilinear), concat with the input, 3x3 conv-BN-ReLU ``bottleneck`` to ``channels``."""

    def __init__(self, in_ch: int, channels: int, pool_scales: list[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(in_ch, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = conv_bn_relu(in_ch + len(pool_scales) * channels, channels, 3)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        size = x_BCHW.shape[-2:]
        pooled = [
            F.interpolate(stage(x_BCHW), size=size, mode="bilinear", align_corners=False)
            for stage in self.stages
        ]
        return self.bottleneck(torch.cat([x_BCHW, *pooled], dim=1))  # (B, channels, H, W)
