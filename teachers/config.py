"""Teacher configs (no torch import here: the CLI loads configs before it needs a model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True)
class TapConfig:
    """One feature read-out point in the teacher's decoder, matched to a student stride."""

    module: str
    """Dotted module path inside the UNet, e.g. ``up_blocks.0.upsamplers.0`` or ``output_blocks.2.2``."""
    point: Literal["output", "input"] = "output"
    """Read the module's output, or its input (``input`` of an upsampler = the paper's pre-upsample features)."""
    stride: int
    """Student stride this level is distilled into (image size / feature size)."""


@dataclass(kw_only=True)
class TeacherConfig:
    """A pretrained diffusion model used as the frozen teacher."""

    kind: Literal["diffusers", "adm"]
    path: str = ""
    """diffusers: a local ``save_pretrained`` folder (model + scheduler config) or a hub id."""
    preset: str = ""
    """adm: named flag preset of a released guided-diffusion checkpoint (e.g. ``adm-256-uncond``)."""
    checkpoint: str = ""
    """adm: path to the guided-diffusion ``.pt`` state dict (loaded with ``weights_only=True``)."""
    flags: dict[str, Any] = field(default_factory=dict)
    """adm: guided-diffusion ``create_model`` flags overriding the preset."""
    class_label: int | None = None
    """adm, class-conditional checkpoints (``class_cond``): the ImageNet class index given for every image.
    Required for those, an error for unconditional ones."""
    taps: list[TapConfig] = field(default_factory=list)
    """Read-out points; empty = the model family's default (the paper's four decoder levels)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Autocast dtype on CUDA. CPU always runs float32."""
    channels_last: bool = True
    """Use channels_last memory format on CUDA."""
