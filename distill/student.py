"""The student: training's one timm backbone wrapper (:class:`training.backbone.Backbone`, timm's parameter names,
strides 4/8/16/32), plus what only distillation needs: starting weights by its config keys and the torchvision
layout of the exported ResNet backbones.
"""

from __future__ import annotations

import torch

from training.backbone import STRIDES, Backbone, build_backbone

STUDENT_STRIDES: tuple[int, ...] = STRIDES
"""The paper's student levels l = 2..5 (stride 2^l)."""


def build_student(name: str, weights: str = "") -> Backbone:
    """Random-init timm student (it is pretraining); ``weights`` optionally starts from a local safetensors file
    (timm names, or ``features_only`` names)."""
    return build_backbone(name, weights, key="distill.student.name", ckpt_key="distill.student.weights")


def torchvision_resnet_state_dict(name: str, timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a timm ResNet backbone to torchvision's ``resnetNN`` key layout (what detectron2 / mmdet convert from).

    timm's plain ResNets (resnet18/34/50/101/152) use torchvision's names already; variants with a deep stem or
    avg-pool shortcut (``resnet50d`` ...) have no torchvision counterpart and are refused. The check compares
    every key and shape against a torchvision model built on the ``meta`` device (no memory).
    """
    import torchvision

    builders = {
        "resnet18": torchvision.models.resnet18,
        "resnet34": torchvision.models.resnet34,
        "resnet50": torchvision.models.resnet50,
        "resnet101": torchvision.models.resnet101,
        "resnet152": torchvision.models.resnet152,
    }
    if name not in builders:
        raise ValueError(f"no torchvision layout for {name!r}; torchvision ResNets: {', '.join(builders)}")
    with torch.device("meta"):
        reference = builders[name](weights=None).state_dict()
    reference = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    problems = [k for k in reference if k not in timm_state or timm_state[k].shape != reference[k].shape]
    extra = [k for k in timm_state if k not in reference]
    if problems or extra:
        raise ValueError(f"{name}: timm and torchvision layouts differ at {(problems + extra)[:5]}")
    return {k: timm_state[k] for k in reference}


def is_torchvision_resnet(name: str) -> bool:
    return name in {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
