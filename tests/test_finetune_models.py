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
