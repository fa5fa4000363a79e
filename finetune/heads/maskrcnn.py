"""torchvision Mask R-CNN on the timm backbone + torchvision FeaturePyramidNetwork (P2..P5 + max-pooled P6).

Box maths stay float32 under bf16 autocast. torchvision takes the anchors' dtype from the feature maps and its box
coder casts the reference boxes to the deltas' dtype, so with bf16 features every anchor, proposal and detection
is a bf16 number: 8 significant bits, i.e. 4-px steps in [512, 1024) and 8-px steps above (1003 -> 1004,
1333 -> 1336), which costs AP75 and small objects. Here the heads' *outputs* (objectness, deltas, class logits,
mask logits: a few channels) are cast to float32 and anchors are generated in float32, while the convolutions and
FC layers that produce them keep running in bf16. Turning autocast off around the RPN instead would run its 3x3
256->256 conv in float32 on every FPN level: about 53 GMAC per 1333x800 image (P2 alone: 200*336 positions *
256*256*9 = 40 GMAC), more than half the cost of the R50 backbone (~87 GMAC), for no gain in box precision.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
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


class Float32AnchorGenerator(AnchorGenerator):
    """Anchors in float32 whatever the feature maps' dtype (torchvision's follows it: bf16 under autocast).

    The feature maps only lend their shape and device, so each is replaced by a zero-stride float32 view of one
    scalar (no copy of the features). Same parameters and state as the parent: checkpoints are unaffected.
    """

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        shapes_only = [
            torch.zeros((), dtype=torch.float32, device=f.device).expand(f.shape) for f in feature_maps
        ]
        return super().forward(image_list, shapes_only)


class Float32RPNHead(RPNHead):
    """RPN head whose objectness and box deltas leave in float32 (so proposals are decoded in float32)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class Float32BoxPredictor(FastRCNNPredictor):
    """Class logits and box deltas in float32 (so detections are decoded from float32 proposals in float32)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class Float32MaskPredictor(MaskRCNNPredictor):
    """Mask logits in float32: the probabilities pasted into the image and thresholded at 0.5 stay float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float()


def build_mask_rcnn(body: Backbone, num_classes: int, cfg: DetectionConfig) -> MaskRCNN:
    """Mask R-CNN with ``num_classes`` foreground classes (+ background), multi-scale train sizes from ``cfg``."""
    backbone = BackboneWithFPN(body, cfg.fpn_channels)
    levels = len(body.channels) + 1
    if len(cfg.anchor_sizes) != levels:
        raise ValueError(
            f"finetune.detection.anchor_sizes needs {levels} sizes (one per FPN level), got {cfg.anchor_sizes}"
        )
    anchors = Float32AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    # Heads as torchvision builds them by default, with the widths taken from the config.
    box_pool = 7 * 7  # MultiScaleRoIAlign output size for boxes
    mask_ch = cfg.mask_head_channels
    return MaskRCNN(
        backbone,
        box_head=TwoMLPHead(cfg.fpn_channels * box_pool, cfg.box_head_dim),
        box_predictor=Float32BoxPredictor(cfg.box_head_dim, num_classes + 1),
        mask_head=MaskRCNNHeads(cfg.fpn_channels, [mask_ch] * 4, 1),
        mask_predictor=Float32MaskPredictor(mask_ch, mask_ch, num_classes + 1),
        min_size=tuple(cfg.train_min_sizes),
        max_size=cfg.max_size,
        rpn_anchor_generator=anchors,
        rpn_head=Float32RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0]),
        box_detections_per_img=cfg.detections_per_img,
        rpn_pre_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
    )
