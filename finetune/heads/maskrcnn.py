"""torchvision Mask R-CNN on the timm backbone + torchvision FeaturePyramidNetwork (P2..P5 + max-pooled P6)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from finetune.config import DetectionConfig
from training.backbone import Backbone


class BackboneWithFPN(nn.Module):
    """Like torchvision's BackboneWithFPN, for a :class:`Backbone` (which returns a list, not a dict)."""

    def __init__(self, body: Backbone, out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images_B3HW: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = OrderedDict((str(i), f) for i, f in enumerate(self.body(images_B3HW)))
        return self.fpn(
            feats
        )  # "0".."3" (strides 4..32) and "pool" (stride 64), each (B, out_channels, h, w)


def build_mask_rcnn(body: Backbone, num_classes: int, cfg: DetectionConfig) -> MaskRCNN:
    """Mask R-CNN with ``num_classes`` foreground classes (+ background), multi-scale train sizes from ``cfg``."""
    backbone = BackboneWithFPN(body, cfg.fpn_channels)
    levels = len(body.channels) + 1
    if len(cfg.anchor_sizes) != levels:
        raise ValueError(
            f"finetune.detection.anchor_sizes needs {levels} sizes (one per FPN level), got {cfg.anchor_sizes}"
        )
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    # Heads as torchvision builds them by default, with the widths taken from the config.
    box_pool = 7 * 7  # MultiScaleRoIAlign output size for boxes
    mask_ch = cfg.mask_head_channels
    return MaskRCNN(
        backbone,
        box_head=TwoMLPHead(cfg.fpn_channels * box_pool, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        mask_head=MaskRCNNHeads(cfg.fpn_channels, [mask_ch] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_ch, mask_ch, num_classes + 1),
        min_size=tuple(cfg.train_min_sizes),
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        box_detections_per_img=cfg.detections_per_img,
        rpn_pre_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
