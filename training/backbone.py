"""timm backbone returning the stride 4/8/16/32 feature maps, loaded from distill's ``backbone.safetensors``.

The weights file uses timm's own parameter names, i.e. the keys of ``timm.create_model(name).state_dict()``
(classifier keys may be absent). Keys in timm's ``features_only`` spelling (``stages_0.`` for ``stages.0.``) are
accepted as well. We keep the plain timm model and call ``forward_intermediates`` rather than wrapping it in
``features_only``'s FeatureListNet, because that wrapper renames nested modules and the file's keys would no longer
match the model's.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.config import Norm

STRIDES: tuple[int, ...] = (4, 8, 16, 32)
_FLAT_SEQUENTIAL = re.compile(r"^([A-Za-z_]+?)_(\d+)\.")


class Backbone(nn.Module):
    """A timm classification model used as a feature pyramid: image (B,3,H,W) -> 4 maps at strides 4/8/16/32."""

    def __init__(self, name: str) -> None:
        super().__init__()
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
            raise ValueError(f"finetune.backbone={name!r} is not a timm model ({exc})") from exc
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"timm model {name!r} has no forward_intermediates(); pick a CNN such as resnet50"
            )
        info = model.feature_info
        self.indices = [i for i, level in enumerate(info) if level["reduction"] in STRIDES]
        reductions = [info[i]["reduction"] for i in self.indices]
        if tuple(reductions) != STRIDES:
            found = [level["reduction"] for level in info]
            raise ValueError(
                f"timm model {name!r} has feature strides {found}; finetune needs {list(STRIDES)}"
            )
        self.channels: list[int] = [info[i]["num_chs"] for i in self.indices]
        self.strides: list[int] = list(STRIDES)
        self.name = name
        model.prune_intermediate_layers(self.indices, prune_head=True)
        self.model = model

    def forward(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        # -> [(B, C_l, H/s_l, W/s_l) for s_l in 4, 8, 16, 32]
        return self.model.forward_intermediates(images_B3HW, indices=self.indices, intermediates_only=True)


def _canonical_key(key: str, expected: set[str]) -> str:
    if key in expected:
        return key
    unflattened = _FLAT_SEQUENTIAL.sub(r"\1.\2.", key)
    return unflattened if unflattened in expected else key


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a safetensors file strictly: every backbone parameter must be present with the right shape.

    Keys of the classifier (pruned here) are ignored; any other unknown key is an error, since it means the file
    belongs to another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} do not exist (finetune.ckpt); empty = random init")
    tensors = load_file(str(path))
    own = backbone.model.state_dict()
    expected = set(own)
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
        lines = [f"{path} does not match timm model {backbone.name!r} (finetune.backbone):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(
                    f"  {title} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                )
        lines.append("Set finetune.backbone to the architecture the file was trained with.")
        raise ValueError("\n".join(lines))
    backbone.model.load_state_dict({k: state[k] for k in expected}, strict=True)


def apply_norm(module: nn.Module, norm: Norm, distributed: bool) -> nn.Module:
    """Batch-norm handling for fine-tuning (see docs/finetune.md): sync / batch / frozen."""
    if norm == "frozen":
        return timm.layers.freeze_batch_norm_2d(module)
    if norm == "sync" and distributed:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def build_backbone(name: str, ckpt: str = "") -> Backbone:
    """timm backbone with strides 4/8/16/32, random init or loaded from ``ckpt``."""
    backbone = Backbone(name)
    if ckpt:
        load_backbone_weights(backbone, ckpt)
    return backbone
