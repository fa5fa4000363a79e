"""Artifacts of a finished run: the backbone (timm names; torchvision layout for ResNets) and the regressor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import save

from configlib import atomic_write_bytes
from distill.model import DistillNet
from distill.student import is_torchvision_resnet, torchvision_resnet_state_dict

log = logging.getLogger(__name__)

BACKBONE_NAME = "backbone.safetensors"
TORCHVISION_NAME = "backbone_torchvision.safetensors"
REGRESSOR_NAME = "regressor.safetensors"


def _save_atomic(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors bytes written atomically: a reader finds the previous file or the whole new one."""
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def export_artifacts(net: DistillNet, folder: str | Path, metadata: dict[str, str]) -> dict[str, Path]:
    """Write ``backbone.safetensors`` (+ torchvision layout for plain ResNets) and ``regressor.safetensors``.

    The backbone loads with ``timm.create_model(name, pretrained=True, num_classes=0,
    pretrained_cfg_overlay=dict(file=path))``; num_classes=0 because distillation trains no classifier head.
    """
    folder = Path(folder)
    name = net.student.name
    meta = {"timm_model": name, **metadata}
    backbone = net.student.timm_state_dict()
    written = {"backbone": folder / BACKBONE_NAME}
    _save_atomic(backbone, written["backbone"], meta)
    if is_torchvision_resnet(name):
        written["torchvision"] = folder / TORCHVISION_NAME
        _save_atomic(
            torchvision_resnet_state_dict(name, backbone),
            written["torchvision"],
            {**meta, "layout": f"torchvision.models.{name}"},
        )
    head = {f"regressor.{k}": v.detach().cpu().contiguous() for k, v in net.regressor.state_dict().items()}
    if net.label_head is not None:
        head.update(
            {f"label_head.{k}": v.detach().cpu().contiguous() for k, v in net.label_head.state_dict().items()}
        )
    written["regressor"] = folder / REGRESSOR_NAME
    out_channels = {n: int(h.out_channels) for n, h in net.regressor.heads.items()}
    _save_atomic(head, written["regressor"], {**meta, "teacher_channels": json.dumps(out_channels)})
    log.info("exported %s", ", ".join(str(p) for p in written.values()))
    return written
