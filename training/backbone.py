"""The one timm backbone wrapper: a plain timm model read at strides 4/8/16/32, in timm's own parameter names.

Used by distill (the student), finetune (UperNet / Mask R-CNN backbones) and whatever trains a backbone next.
We keep the plain ``timm.create_model(name)`` and call ``forward_intermediates`` rather than wrapping it in
``features_only``'s FeatureListNet, because that wrapper renames flattened sequential modules (ConvNeXt
``stages.0`` -> ``stages_0``): with the plain model, ``state_dict()`` *is* timm's naming, so an exported file
loads into ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), num_classes=0)``
and no key map is needed. :func:`load_backbone_weights` also reads files written in the ``features_only``
spelling (state dicts saved from a ``features_only=True`` model, and distill exports of other tools); that is
its only reason to know that spelling.

Construction order is that of ``timm.create_model(name)`` (classifier included, then pruned), the same as
``features_only=True`` builds it, so a seed gives the same initial weights either way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import timm
import torch
from safetensors.torch import load_file
from torch import nn

STRIDES: tuple[int, ...] = (4, 8, 16, 32)
"""The pyramid every consumer reads (the paper's student levels l = 2..5, stride 2^l)."""
_FLAT_SEQUENTIAL = re.compile(r"^([A-Za-z_]+?)_(\d+)\.")

NormMode = Literal["sync", "batch", "frozen"]


class Backbone(nn.Module):
    """A timm classification model used as a feature pyramid: image (B,3,H,W) -> 4 maps at strides 4/8/16/32.

    ``key`` is the config key the model name came from (``finetune.backbone``, ``distill.student.name``), for
    error messages. Layers after the last level and the classifier (with ConvNeXt's head norm) are pruned, so
    every parameter gets a gradient (DDP runs without ``find_unused_parameters``).
    """

    def __init__(self, name: str, *, key: str = "finetune.backbone") -> None:
        super().__init__()
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
            raise ValueError(f"{key}={name!r} is not a timm model ({exc})") from exc
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{key}={name!r}: this timm model has no forward_intermediates(); pick a CNN")
        reductions = [level["reduction"] for level in model.feature_info]
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise ValueError(
                f"{key}={name!r} has feature strides {reductions}, missing {missing}; pick a CNN with levels "
                f"at strides {list(STRIDES)} (resnet18/50/101, convnext_atto/base)"
            )
        # The last level at each stride (ConvNeXt has no stride-2 level, ResNet's stride 2 is the stem).
        self.indices = [max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES]
        self.channels: list[int] = [model.feature_info[i]["num_chs"] for i in self.indices]
        self.strides: list[int] = list(STRIDES)
        self.name = name
        self.pretrained_cfg: dict = dict(model.pretrained_cfg)
        model.prune_intermediate_layers(self.indices, prune_head=True)  # drops the classifier (+ its norm)
        self.model = model

    def forward(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        # -> [(B, C_l, H/s_l, W/s_l) for s_l in 4, 8, 16, 32]
        return self.model.forward_intermediates(images_B3HW, indices=self.indices, intermediates_only=True)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in timm's parameter names as contiguous CPU tensors (ready for safetensors)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}


def _canonical_key(key: str, expected: set[str]) -> str:
    """A key of a file written in ``features_only`` spelling (``stages_0.``) -> timm's (``stages.0.``)."""
    if key in expected:
        return key
    unflattened = _FLAT_SEQUENTIAL.sub(r"\1.\2.", key)
    return unflattened if unflattened in expected else key


def load_backbone_weights(
    backbone: Backbone,
    path: str | Path,
    *,
    key: str = "finetune.ckpt",
    name_key: str = "finetune.backbone",
) -> None:
    """Load a safetensors file strictly: every backbone parameter must be present with the right shape.

    Keys of the classifier (pruned here) are ignored; any other unknown key is an error, since it means the file
    belongs to another architecture. ``key`` / ``name_key`` name the config keys of the file and the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: backbone weights {path} do not exist; empty = random init")
    tensors = load_file(str(path))
    own = backbone.model.state_dict()
    expected = set(own)
    with torch.device("meta"):  # names only: no memory, no init time, no RNG draws
        head_keys = set(timm.create_model(backbone.name, pretrained=False).state_dict()) - expected
    state = {_canonical_key(k, expected): v for k, v in tensors.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in state if k not in expected and k not in head_keys)
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"{path} does not match timm model {backbone.name!r} ({name_key}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                )
        lines.append(
            f"Is it a checkpoint of a different architecture? Set {name_key} to the one the file was trained with."
        )
        raise ValueError("\n".join(lines))
    backbone.model.load_state_dict({k: state[k] for k in expected}, strict=True)


def apply_norm(module: nn.Module, norm: NormMode, sync_batchnorm: bool) -> nn.Module:
    """Batch-norm handling for fine-tuning (see docs/finetune.md): sync / batch / frozen.

    ``sync`` converts to SyncBatchNorm only where it can run (``Runtime.sync_batchnorm``: DDP on CUDA); elsewhere
    it is plain batch norm, as on a single process."""
    if norm == "frozen":
        return timm.layers.freeze_batch_norm_2d(module)
    if norm == "sync" and sync_batchnorm:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def build_backbone(
    name: str, ckpt: str = "", *, key: str = "finetune.backbone", ckpt_key: str = "finetune.ckpt"
) -> Backbone:
    """timm backbone with strides 4/8/16/32, random init or loaded from ``ckpt``."""
    backbone = Backbone(name, key=key)
    if ckpt:
        load_backbone_weights(backbone, ckpt, key=ckpt_key, name_key=key)
    return backbone
