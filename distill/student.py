"""The student backbone: a timm model read at strides 4/8/16/32, plus weight export.

timm's ``features_only`` wrapper renames flattened sequential modules (ConvNeXt ``stages.0`` -> ``stages_0``,
``stem.0`` -> ``stem_0``; ResNet names survive), so the student keeps a key map to the original model's names and
exports/imports in those: the exported file loads into a fresh ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), num_classes=0)`` (or ``features_only=True``). A key that cannot be mapped
is an error, never a silently random layer (timm loads non-strictly when num_classes differs).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

STUDENT_STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""The paper's student levels l = 2..5 (stride 2^l)."""


class Student(nn.Module):
    """A timm backbone returning one feature map per stride in :data:`STUDENT_STRIDES`."""

    def __init__(self, name: str, weights: str = "") -> None:
        super().__init__()
        with torch.device("meta"):  # names and feature_info only: no memory, no init time
            full = timm.create_model(name, pretrained=False, num_classes=0)
        reductions = [info["reduction"] for info in full.feature_info]
        missing = [s for s in STUDENT_STRIDES if s not in reductions]
        if missing:
            raise ValueError(
                f"student {name!r} has feature strides {reductions}, missing {missing}; "
                f"pick a CNN with levels at strides {list(STUDENT_STRIDES)} (resnet18/50/101, convnext_atto/base)"
            )
        # The last level at each stride (ConvNeXt has no stride-2 level, ResNet's stride 2 is the stem).
        out_indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STUDENT_STRIDES]
        self.name = name
        self.body = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
        self.strides: list[int] = list(STUDENT_STRIDES)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.pretrained_cfg: dict = dict(self.body.pretrained_cfg)
        self.timm_names = _timm_key_map(name, list(self.body.state_dict()), set(full.state_dict()))
        """features-only key -> the full timm model's key."""
        if weights:
            self.load_weights(weights)

    def forward(self, images_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` normalised images -> one ``(B, C_l, H/s, W/s)`` map per stride."""
        return self.body(images_BCHW)

    def load_weights(self, path: str | Path) -> None:
        """Load a safetensors file in timm parameter names; head keys are ignored, missing keys are an error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"distill.student.weights: {str(path)!r} does not exist")
        from_timm = {timm_key: key for key, timm_key in self.timm_names.items()}
        state = {from_timm.get(k, k): v for k, v in load_file(str(path)).items()}
        own = self.body.state_dict()
        unused = sorted(k for k in state if k not in own)
        missing = sorted(k for k in own if k not in state)
        if missing:
            raise ValueError(
                f"{path} lacks {len(missing)} parameter(s) of {self.name} (e.g. {missing[:3]}); "
                "is it a checkpoint of a different architecture?"
            )
        self.body.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        if unused:
            log.info(
                "student weights %s: ignored %d key(s) outside the backbone (e.g. %s)",
                path,
                len(unused),
                unused[:3],
            )

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone weights in timm's parameter names (contiguous CPU tensors, ready for safetensors)."""
        return {
            self.timm_names[k]: v.detach().to("cpu").contiguous() for k, v in self.body.state_dict().items()
        }


def _timm_key_map(name: str, feature_keys: list[str], timm_keys: set[str]) -> dict[str, str]:
    """Undo timm's ``flatten_sequential`` renaming (first ``.`` -> ``_``); every key must land on a real one."""
    mapping, unmapped = {}, []
    for key in feature_keys:
        candidate = key if key in timm_keys else key.replace("_", ".", 1)
        if candidate in timm_keys:
            mapping[key] = candidate
        else:
            unmapped.append(key)
    if unmapped or len(set(mapping.values())) != len(mapping):
        raise ValueError(
            f"{name}: cannot map features-only parameter names to timm's ({unmapped[:3]}); "
            "this student cannot be exported in timm's names"
        )
    return mapping


def build_student(name: str, weights: str = "") -> Student:
    """Random-init timm student (it is pretraining); ``weights`` optionally starts from a local file."""
    return Student(name, weights)


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
