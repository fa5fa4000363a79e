"""UperNet (Xiao et al. 2018) as in mmsegmentation's ``UPerHead`` + ``FCNHead`` auxiliary, on a 4-level backbone.

Why not a library: torchvision and timm ship no UperNet; mmsegmentation would pull mmcv/mmengine for ~100 lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import UperNetConfig
from training.backbone import Backbone
from training.blocks import PyramidPooling, conv_bn_relu


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """PPM on the coarsest level, FPN top-down fusion, concat of all levels at stride 4, 1x1 classifier."""

    def __init__(self, in_channels: list[int], num_classes: int, cfg: UperNetConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.ppm = PyramidPooling(in_channels[-1], ch, cfg.pool_scales)
        self.lateral = nn.ModuleList(conv_bn_relu(c, ch, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(ch, ch, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * ch, ch, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        # 1. Laterals: 1x1 convs on levels 0..2, PPM on level 3 -> all (B, ch, H_l, W_l).
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1], strict=False)] + [
            self.ppm(feats[-1])
        ]
        # 2. Top-down: add the upsampled coarser level.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        # 3. 3x3 smoothing on the fused levels (the PPM output is used as is), upsample to stride 4, concat.
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1], strict=False)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_resize(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))  # (B, K, H/4, W/4)


class FCNHead(nn.Module):
    """Auxiliary head: one 3x3 conv-BN-ReLU and a 1x1 classifier on the stride-16 level."""

    def __init__(self, in_ch: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_ch, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x_BCHW)))  # (B, K, H/16, W/16)


class UperNet(nn.Module):
    """Backbone + UperNet head (+ auxiliary FCN head). Returns logits at the input resolution."""

    AUX_LEVEL = 2  # stride 16, as in mmsegmentation's UperNet configs

    def __init__(self, backbone: Backbone, num_classes: int, cfg: UperNetConfig) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"UperNet needs num_classes >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.decode_head = UperNetHead(backbone.channels, num_classes, cfg)
        self.aux_weight = cfg.aux_weight
        self.aux_head = (
            FCNHead(backbone.channels[self.AUX_LEVEL], cfg.aux_channels, num_classes, cfg.dropout)
            if cfg.aux_weight > 0
            else None
        )

    def forward(self, images_B3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images_B3HW)
        size = images_B3HW.shape[-2:]
        out = {"logits": _resize(self.decode_head(feats), size)}  # (B, K, H, W)
        if self.aux_head is not None and self.training:
            out["aux_logits"] = _resize(self.aux_head(feats[self.AUX_LEVEL]), size)
        return out

    def loss(self, out: dict[str, torch.Tensor], labels_BHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (ignore 255) on the main head, plus ``aux_weight`` x the auxiliary head's."""
        losses = {"loss_seg": masked_cross_entropy(out["logits"], labels_BHW)}
        if "aux_logits" in out:
            losses["loss_aux"] = self.aux_weight * masked_cross_entropy(out["aux_logits"], labels_BHW)
        return losses


def masked_cross_entropy(logits_BKHW: torch.Tensor, labels_BHW: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels (255 = ignore); 0 (with gradient) when a batch has none.

    ``F.cross_entropy(..., ignore_index=255)`` returns NaN for an all-ignored batch, which a random crop can produce.
    """
    total = F.cross_entropy(logits_BKHW.float(), labels_BHW, ignore_index=255, reduction="sum")
    return total / (labels_BHW != 255).sum().clamp(min=1)
