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


KIND_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "gan": ("truncation", "classes", "num_images"),
    "latent-diffusion": ("vae_input_scale",),
}
"""Fields that mean something for one kind only. Recorded provenance leaves them out for the other kinds, so the
teacher config (and the fingerprint) of a bank encoded before they existed is unchanged."""


RUNTIME_FIELDS: tuple[str, ...] = ("attention", "compile", "early_stop")
"""How the read-out is executed, not what it computes (like ``encode.batch_size`` or the device): a bank's
provenance leaves them out, so they never change a fingerprint, and a rebuilt read-out (distill's online targets)
takes them from this machine's config entry."""


@dataclass(kw_only=True)
class TeacherConfig:
    """A pretrained diffusion model used as the frozen teacher."""

    kind: Literal["diffusers", "adm", "gan", "latent-diffusion"]
    path: str = ""
    """diffusers: a local ``save_pretrained`` folder (model + scheduler config) or a hub id. gan: the checkpoint
    folder (``config.json`` + ``pytorch_model.bin``). latent-diffusion: a Stable Diffusion pipeline folder
    (``unet/``, ``vae/``, ``scheduler/`` and ``text_encoder/`` + ``tokenizer/`` or ``empty_prompt.safetensors``)."""
    preset: str = ""
    """adm: named flag preset of a released guided-diffusion checkpoint (e.g. ``adm-256-uncond``)."""
    checkpoint: str = ""
    """adm: path to the guided-diffusion ``.pt`` state dict (loaded with ``weights_only=True``)."""
    flags: dict[str, Any] = field(default_factory=dict)
    """adm: guided-diffusion ``create_model`` flags overriding the preset."""
    class_label: int | None = None
    """adm, class-conditional checkpoints (``class_cond``): the ImageNet class index given for every image.
    Required for those, an error for unconditional ones."""
    truncation: float = 1.0
    """gan: truncation of the latent (z ~ truncation * N(0, 1) cut at +-2) and of the batch-norm statistics; (0, 1]."""
    classes: list[int] = field(default_factory=list)
    """gan: the ImageNet classes synthesized, each row's drawn uniformly from this list; empty = all classes."""
    num_images: int = 0
    """gan: images synthesized into a bank by ``dreamteacher encode`` (one row each); must be >= 1 for a gan."""
    vae_input_scale: int = 2
    """latent-diffusion: the image is resized by this factor before the VAE (8x down), so the UNet's four decoder
    levels land on strides 32, 16, 8, 4 of the student's image (with 1 they are 64, 32, 16, 8)."""
    taps: list[TapConfig] = field(default_factory=list)
    """Read-out points; empty = the model family's default (the paper's four decoder levels)."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Autocast dtype on CUDA. CPU always runs float32."""
    channels_last: bool = True
    """Use channels_last memory format on CUDA."""
    early_stop: bool = True
    """Stop the read-out pass once the last tap has fired: the decoder above it and the output head never run
    (2.3x fewer FLOPs on ADM-256 with the paper's taps). The taps' values are the same bit for bit; DDIM
    inversion's steps still run the whole UNet. GAN teachers always run whole (their image is stored)."""
    attention: Literal["sdpa", "einsum"] = "sdpa"
    """adm: self-attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on CUDA) or the original's einsum + float32 softmax. diffusers UNets already use SDPA."""
    compile: bool = False
    """``torch.compile`` the read-out pass (the first batch of each shape compiles: minutes; worth it for a long
    encode on a GPU)."""

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.truncation <= 1.0:
            problems.append(f"truncation must be in (0, 1], got {self.truncation}")
        if self.num_images < 0:
            problems.append(f"num_images must be >= 0, got {self.num_images}")
        if self.vae_input_scale < 1:
            problems.append(f"vae_input_scale must be >= 1, got {self.vae_input_scale}")
        if problems:
            raise ValueError("\n".join(problems))
