"""The feature interpreter: teacher features -> per-pixel class logits (the paper's label distillation).

BigDatasetGAN-style fuse layers (the DreamTeacher paper, "Feature regressor and losses"; ``../shared/reference``):

1. per tapped level, a non-learnable per-sample LayerNorm (the whitening distillation applies to the same
   features: teacher levels differ in scale by orders of magnitude) and a 1x1 conv to ``channels``;
2. bilinear upsampling of every level to the finest level's grid, concatenation;
3. a depthwise-separable conv (3x3 depthwise + 1x1 pointwise to ``channels``), GroupNorm(32), Swish, dropout 0.1;
4. a 1x1 conv to the class logits, at the finest level's grid (stride 4 for the paper's ADM taps).

Trained with ``CE + 3.0 * Dice`` (:func:`interpreter_loss`) on the teacher features of a few labelled images;
its logits become the bank's soft labels (``bank.labels``) and, for online targets, are computed on the fly.
It lives with the teachers (a contract) because encode-side writing and distill-side online use both need it.

A trained interpreter is one safetensors file: the weights plus its config and class names as metadata
(:func:`save_interpreter` / :func:`load_interpreter`; no pickle). Its identity is the file's sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sources.segmentation import IGNORE
from teachers.base import files_sha256

IGNORE_INDEX = IGNORE
"""Label value of unlabelled pixels: the segmentation layouts' (``sources.segmentation.IGNORE``)."""
DICE_SMOOTH = 1.0
"""Additive smoothing of the Dice ratio: keeps a class absent from the batch and the prediction at loss 0."""
FORMAT = "dreamteacher-interpreter/1"


@dataclass(kw_only=True)
class InterpreterConfig:
    """The architecture (saved with the weights)."""

    level_channels: dict[str, int]
    """Tapped level name (``s<stride>``) -> teacher channels."""
    level_strides: dict[str, int]
    """Level name -> stride; the output grid is the smallest stride's."""
    num_classes: int
    channels: int = 256
    dropout: float = 0.1
    groups: int = 32
    class_names: list[str] = field(default_factory=list)

    @property
    def stride(self) -> int:
        """Stride of the logits grid (the finest level)."""
        return min(self.level_strides.values())


class FeatureInterpreter(nn.Module):
    """``{level: feats_BCHW} -> logits_BKHW`` at the finest level's grid."""

    def __init__(self, cfg: InterpreterConfig) -> None:
        super().__init__()
        if cfg.channels % cfg.groups:
            raise ValueError(
                f"interpreter channels {cfg.channels} is not a multiple of GroupNorm groups {cfg.groups}"
            )
        if set(cfg.level_channels) != set(cfg.level_strides):
            raise ValueError(
                f"level channels {sorted(cfg.level_channels)} vs strides {sorted(cfg.level_strides)}"
            )
        self.cfg = cfg
        self.levels = sorted(cfg.level_channels, key=lambda name: cfg.level_strides[name])  # finest first
        self.reduce = nn.ModuleDict(
            {name: nn.Conv2d(cfg.level_channels[name], cfg.channels, 1) for name in self.levels}
        )
        fused = cfg.channels * len(self.levels)
        self.fuse = nn.Sequential(
            nn.Conv2d(fused, fused, 3, padding=1, groups=fused, bias=False),  # depthwise
            nn.Conv2d(fused, cfg.channels, 1, bias=False),  # pointwise
            nn.GroupNorm(cfg.groups, cfg.channels),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
        )
        self.classifier = nn.Conv2d(cfg.channels, cfg.num_classes, 1)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.levels if name not in feats]
        if missing:
            raise ValueError(f"interpreter needs levels {self.levels}; missing {missing}")
        size = feats[self.levels[0]].shape[-2:]
        reduced = []
        for name in self.levels:
            feat_BCHW = feats[name].float()
            white_BCHW = F.layer_norm(feat_BCHW, feat_BCHW.shape[1:], eps=1e-6)
            x_BCHW = self.reduce[name](white_BCHW)
            if x_BCHW.shape[-2:] != size:
                x_BCHW = F.interpolate(x_BCHW, size=size, mode="bilinear", align_corners=False)
            reduced.append(x_BCHW)
        return self.classifier(self.fuse(torch.cat(reduced, dim=1)))


def dice_loss(
    logits_BKHW: torch.Tensor, labels_BHW: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """``1 - mean_k (2 sum p_k y_k + s) / (sum p_k + sum y_k + s)`` over the batch's labelled pixels.

    ``p`` = softmax over classes, ``y`` = one-hot labels; sums over every labelled pixel of the batch (pixels at
    :data:`IGNORE_INDEX` are left out of both), the mean over all K classes (a class absent from labels and
    prediction scores ~1). The soft (probability) form keeps it differentiable.
    """
    probs_BKHW = logits_BKHW.float().softmax(dim=1)
    valid_BHW = labels_BHW != IGNORE_INDEX
    onehot_BKHW = F.one_hot(torch.where(valid_BHW, labels_BHW, 0).long(), logits_BKHW.shape[1])
    onehot_BKHW = onehot_BKHW.permute(0, 3, 1, 2).float() * valid_BHW[:, None]
    probs_BKHW = probs_BKHW * valid_BHW[:, None]
    inter_K = (probs_BKHW * onehot_BKHW).sum(dim=(0, 2, 3))
    total_K = probs_BKHW.sum(dim=(0, 2, 3)) + onehot_BKHW.sum(dim=(0, 2, 3))
    return 1.0 - ((2.0 * inter_K + smooth) / (total_K + smooth)).mean()


def interpreter_loss(
    logits_BKhw: torch.Tensor, labels_BHW: torch.Tensor, *, dice_weight: float = 3.0
) -> dict[str, torch.Tensor]:
    """``ce``, ``dice`` and ``loss = ce + dice_weight * dice`` (the paper: 3.0), on the logits upsampled
    (bilinear) to the label map's size; cross-entropy averages over the labelled pixels."""
    logits_BKHW = F.interpolate(
        logits_BKhw.float(), size=labels_BHW.shape[-2:], mode="bilinear", align_corners=False
    )
    ce = F.cross_entropy(logits_BKHW, labels_BHW.long(), ignore_index=IGNORE_INDEX)
    dice = dice_loss(logits_BKHW, labels_BHW)
    return {"ce": ce, "dice": dice, "loss": ce + dice_weight * dice}


# ---- files -----------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """The interpreter's identity: what ``sha256sum FILE`` prints."""
    return files_sha256([Path(path)])


def save_interpreter(
    model: FeatureInterpreter, path: str | Path, *, extra: dict[str, Any] | None = None
) -> str:
    """Write the weights and config (+ ``extra`` provenance, e.g. the training data and its mIoU) as one
    safetensors file, atomically; returns its sha256 (the interpreter's identity)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(asdict(model.cfg), sort_keys=True)}
    meta["extra"] = json.dumps(extra or {}, sort_keys=True, default=str)
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return file_sha256(path)


def load_interpreter(
    path: str | Path, device: torch.device | str = "cpu", *, sha256: str = ""
) -> tuple[FeatureInterpreter, dict[str, Any]]:
    """The interpreter of a :func:`save_interpreter` file in eval mode, and its ``extra`` metadata.

    ``sha256``: refuse a file whose hash differs (the one a bank's soft labels were written with)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interpreter {path} does not exist; train one with `dreamteacher interpret`")
    if sha256 and (actual := file_sha256(path)) != sha256:
        raise ValueError(
            f"interpreter {path} has sha256 {actual[:12]}, the bank's soft labels were written by "
            f"{sha256[:12]}; point at the original file or re-run `dreamteacher interpret --overwrite`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an interpreter file (format {meta.get('format')!r}, expected {FORMAT})"
        )
    cfg = InterpreterConfig(**json.loads(meta["config"]))
    model = FeatureInterpreter(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval(), json.loads(meta.get("extra", "{}"))
