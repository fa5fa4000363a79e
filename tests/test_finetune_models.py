"""Finetune models: backbone contract + weight loading, both heads on every supported backbone, training steps."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.config import DetectionConfig, UperNetConfig
from finetune.heads.maskrcnn import build_mask_rcnn
from finetune.heads.upernet import UperNet
from training.backbone import Backbone, build_backbone, load_backbone_weights

BACKBONES = ["resnet18", "convnext_atto"]
TINY_HEAD = UperNetConfig(channels=16, aux_channels=8)
TINY_DET = DetectionConfig(
    train_min_sizes=[64],
    max_size=64,
    fpn_channels=32,
    anchor_sizes=[8, 16, 32, 64, 128],
    detections_per_img=20,
    box_head_dim=64,
    mask_head_channels=16,
)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_builds_both_heads(name):
    torch.manual_seed(0)
    backbone = Backbone(name)
    images = torch.randn(2, 3, 64, 64)
    feats = backbone(images)
    assert [f.shape[-1] for f in feats] == [64 // s for s in backbone.strides]
    assert [f.shape[1] for f in feats] == backbone.channels
    seg = UperNet(backbone, 5, TINY_HEAD).train()
    out = seg(images)
    assert out["logits"].shape == (2, 5, 64, 64) and out["aux_logits"].shape == (2, 5, 64, 64)
    det = build_mask_rcnn(Backbone(name), 3, TINY_DET).eval()
    with torch.no_grad():
        (pred,) = det([torch.rand(3, 64, 64)])
    assert set(pred) == {"boxes", "labels", "scores", "masks"}


def test_weights_roundtrip_in_timm_names_and_features_only_names(tmp_path):
    source = timm.create_model("convnext_atto")  # full classifier state dict, timm's own names
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_backbone("convnext_atto", str(path))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key])
    flat = tmp_path / "flat.safetensors"  # features_only spelling: stages_0.* instead of stages.0.*
    state = {
        k.replace("stages.", "stages_").replace("stem.", "stem_"): v.contiguous()
        for k, v in source.state_dict().items()
        if not k.startswith("head")
    }
    save_file(state, str(flat))
    load_backbone_weights(Backbone("convnext_atto"), flat)


def test_weights_from_another_architecture_fail_clearly(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))
    with pytest.raises(
        ValueError, match=r"(?s)r18.safetensors does not match timm model 'convnext_atto'.*missing"
    ):
        build_backbone("convnext_atto", str(path))
    partial = tmp_path / "partial.safetensors"
    state = timm.create_model("resnet18").state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != "layer4.1.bn2.weight"}, str(partial))
    with pytest.raises(ValueError, match=r"missing \(1\): layer4.1.bn2.weight"):
        build_backbone("resnet18", str(partial))


def test_unknown_backbone_lists_the_problem():
    with pytest.raises(ValueError, match="not a timm model"):
        Backbone("resnet_does_not_exist")


def test_segmentation_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = UperNet(Backbone("resnet18"), 3, TINY_HEAD).train()
    images = torch.randn(2, 3, 32, 32)
    labels = (images[:, 0] > 0).long() + (images[:, 1] > 1).long()
    labels[:, :2] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(model.loss(model(images), labels).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_all_ignored_batch_gives_zero_loss_not_nan():
    model = UperNet(Backbone("resnet18"), 3, TINY_HEAD).train()
    losses = model.loss(model(torch.randn(2, 3, 32, 32)), torch.full((2, 32, 32), 255))
    assert all(v.item() == 0.0 for v in losses.values())


def _det_batch():
    images = [torch.full((3, 64, 64), 0.5) for _ in range(2)]
    images[0][:, 8:40, 10:50] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:50] = 1
    targets = [
        {"boxes": torch.tensor([[10.0, 8.0, 50.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks},
        # an image without instances (COCO images without annotations, filter_empty_train=false)
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 64, 64, dtype=torch.uint8),
        },
    ]
    return images, targets


def test_detection_steps_reduce_the_loss_with_an_empty_target():
    torch.manual_seed(0)
    model = build_mask_rcnn(Backbone("resnet18"), 2, TINY_DET).train()
    images, targets = _det_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_detection_batch_of_only_empty_targets():
    model = build_mask_rcnn(Backbone("resnet18"), 2, TINY_DET).train()
    _, targets = _det_batch()
    losses = model([torch.rand(3, 64, 64)], [targets[1]])
    assert torch.isfinite(sum(losses.values())) and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


# --- Mask R-CNN box maths under bf16 autocast (issue 18 item 9) ---------------------------------------------
# bf16 has 8 significant bits: every value in [512, 1024) is a multiple of 4 and in [1024, 2048) of 8. Boxes
# computed in bf16 land on that grid (1003 -> 1004, 1333 -> 1336); float32 boxes practically never do.


def _on_bf16_grid(coords: torch.Tensor) -> torch.Tensor:
    """True where a coordinate equals its own bf16 rounding (the grid a bf16 box is stuck on)."""
    return coords == coords.to(torch.bfloat16).float()


def test_mask_rcnn_anchors_stay_float32_under_bf16_feature_maps():
    from torchvision.models.detection.image_list import ImageList

    model = build_mask_rcnn(Backbone("resnet18"), 3, TINY_DET)
    images = ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1333)])
    shapes = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]  # P2..P6 of a COCO-size image
    feats32 = [torch.zeros(1, 1, h, w) for h, w in shapes]
    (reference,) = model.rpn.anchor_generator(images, feats32)
    (anchors,) = model.rpn.anchor_generator(images, [f.to(torch.bfloat16) for f in feats32])
    assert anchors.dtype == torch.float32
    assert torch.equal(anchors, reference)
    # By hand: P2 (stride 4, size 8), row 0, column 257 -> centre (1028, 0); its first anchor (aspect 0.5) is
    # round(8 / sqrt(0.5) / 2) = 6 wide and round(8 * sqrt(0.5) / 2) = 3 high each side: [1022, -3, 1034, 3].
    # bf16 cannot hold 1022 or 1034 (8-px steps above 1024).
    assert reference[257 * 3].tolist() == [1022.0, -3.0, 1034.0, 3.0]


def test_mask_rcnn_boxes_are_float32_and_off_the_bf16_grid_under_cpu_autocast():
    torch.manual_seed(0)
    cfg = DetectionConfig(**{**TINY_DET.__dict__, "train_min_sizes": [64], "max_size": 1024})
    model = build_mask_rcnn(Backbone("resnet18"), 3, cfg).eval()
    proposals = []
    model.rpn.register_forward_hook(lambda module, args, out: proposals.extend(out[0]))
    image = torch.rand(3, 64, 1024)  # wide: boxes reach x in [512, 1024), where bf16 steps are 4 px
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (pred,) = model([image])
    (props,) = proposals
    assert props.dtype == torch.float32 and pred["boxes"].dtype == torch.float32
    assert pred["scores"].dtype == torch.float32 and pred["masks"].dtype == torch.float32
    for boxes in (props, pred["boxes"]):
        far = boxes[:, 0::2][(boxes[:, 0::2] >= 512) & (boxes[:, 0::2] < 1024)]
        assert far.numel() >= 10, "the test needs boxes in the 4-px bf16 range"
        # In bf16 every one of them is on the grid; in float32 (almost) none are.
        assert _on_bf16_grid(far).float().mean().item() < 0.2


def test_mask_rcnn_training_losses_under_cpu_autocast_are_float32_and_finite():
    torch.manual_seed(0)
    model = build_mask_rcnn(Backbone("resnet18"), 2, TINY_DET).train()
    images, targets = _det_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_parameter_gets_a_gradient(name):
    # DDP runs without find_unused_parameters: a parameter outside the pyramid (ConvNeXt's head.norm) would
    # fail the second step, so the wrapper must not keep one
    backbone = Backbone(name)
    sum(f.mean() for f in backbone(torch.randn(2, 3, 64, 64))).backward()
    unused = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert not unused


def test_upernet_and_distill_regressor_share_one_pyramid_pooling():
    from distill.regressor import FeatureRegressor
    from training.blocks import PyramidPooling

    seg = UperNet(Backbone("resnet18"), 3, TINY_HEAD)
    regressor = FeatureRegressor([8, 8, 8, 8], {"s4": 2}, ["s4", "s8", "s16", "s32"], channels=8)
    assert type(seg.decode_head.ppm) is PyramidPooling and type(regressor.ppm) is PyramidPooling
    # scale-1 branch by hand: 1x1 conv of the spatial mean, broadcast back (BN in eval with fresh stats ~ id)
    ppm = PyramidPooling(2, 1, [1]).eval()
    with torch.no_grad():
        ppm.stages[0][1][0].weight.fill_(1.0)  # 1x1 conv: sum over the 2 input channels
        x = torch.rand(1, 2, 4, 4)
        branch = ppm.stages[0](x)
    expected = torch.relu(x.mean(dim=(2, 3), keepdim=True).sum(1, keepdim=True) / (1 + 1e-5) ** 0.5)
    torch.testing.assert_close(branch, expected)
