"""Latent diffusion (Stable Diffusion 1.x / 2.x) through diffusers as a frozen teacher.

Read-out of a clean image x0 in [-1, 1] (``TeacherEncoder`` with this teacher):

1. ``to_diffusion_space``: resize x0 by ``vae_input_scale`` (bicubic; 2 by default), encode with the
   ``AutoencoderKL`` and take the latent distribution's **mean** times ``vae.config.scaling_factor``
   (0.18215 for SD 1.x / 2.x) -- what SD was trained on, without the posterior's sampling noise;
2. noise to T in latent space (``q_sample`` with per-row noise of :meth:`noise_shape`, the latent's shape);
3. one ``UNet2DConditionModel`` pass at T conditioned on the **empty prompt**: its text embedding
   (1, 77, D) is computed once at load with the pipeline's own tokenizer and text encoder (``transformers``), or
   read from ``empty_prompt.safetensors`` (key ``prompt_embeds``) in the folder, so an encode needs no text model;
4. taps on the decoder blocks.

Strides are relative to the student's image (``resolution``). The VAE downsamples 8x, so SD's four decoder
levels sit at 64, 32, 16, 8 of the image the VAE sees; feeding it the student's image upsampled 2x puts them at
32, 16, 8, 4 of the student's image, the paper's levels (``vae_input_scale: 1`` keeps the image as it is and gives
64..8, which distill refuses for s64). ``resolution`` is therefore the UNet's native latent size x 8 /
``vae_input_scale``: 256 px for SD 1.4 / 1.5 (512 px native), 384 for SD 2.1 (768), 256 for SD 2.1-base.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from teachers.base import Teacher
from teachers.config import TapConfig
from teachers.diffusers_unet import _LOAD, PREDICTION_TYPES, _weight_files, decoder_taps

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel

PROMPT_FILE = "empty_prompt.safetensors"
PROMPT_KEY = "prompt_embeds"


def empty_prompt_embeds(folder: Path, *, key: str) -> tuple[torch.Tensor, str, list[Path]]:
    """(1, L, D) embedding of the empty prompt, where it came from, and the files it was computed from.

    ``empty_prompt.safetensors`` in the folder wins; else the pipeline's ``tokenizer/`` + ``text_encoder/``
    (StableDiffusionPipeline.encode_prompt's way: pad "" to the tokenizer's max length, last hidden state)."""
    file = folder / PROMPT_FILE
    if file.is_file():
        from safetensors.torch import load_file

        embeds = load_file(file)[PROMPT_KEY].float()
        if embeds.ndim == 2:
            embeds = embeds[None]
        return embeds[:1], PROMPT_FILE, [file]
    if not ((folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()):
        raise FileNotFoundError(
            f"{key} {str(folder)!r} has neither {PROMPT_FILE} nor text_encoder/ + tokenizer/; the empty prompt's "
            "embedding comes from one of them (save the whole StableDiffusionPipeline)"
        )
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise ImportError(
            f"{key}: computing the empty prompt's embedding needs `transformers` (pip install transformers), or "
            f"put it in {folder / PROMPT_FILE} (key {PROMPT_KEY!r}, shape (1, 77, D)) once, on a machine that has it"
        ) from exc
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    ids = tokenizer(
        [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0].float()
    return embeds, "text_encoder", _weight_files(folder / "text_encoder")


class LatentDiffusionTeacher(Teacher):
    """``UNet2DConditionModel`` + ``AutoencoderKL`` + schedule + the empty prompt's embedding."""

    prompt_embeds: torch.Tensor

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        prompt_embeds_1LD: torch.Tensor,
        *,
        vae_input_scale: int = 2,
        path: str = "",
        prompt_source: str = "",
        weight_files: tuple[Path, ...] = (),
    ) -> None:
        super().__init__()
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
        if vae_input_scale < 1:
            raise ValueError(f"vae_input_scale must be >= 1, got {vae_input_scale}")
        size = unet.config.sample_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.unet, self.vae = unet, vae
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_input_scale = int(vae_input_scale)
        if (size * self.vae_factor) % self.vae_input_scale:
            raise ValueError(
                f"the UNet's {size * self.vae_factor} px native size is not divisible by vae_input_scale "
                f"{self.vae_input_scale}"
            )
        self.resolution = size * self.vae_factor // self.vae_input_scale
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.prediction_type = prediction_type
        self.path, self.prompt_source = path, prompt_source
        self.scheduler_config = dict(scheduler.config)
        self.weight_files = tuple(weight_files)
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.detach().to(torch.float64), persistent=False
        )
        self.register_buffer("prompt_embeds", prompt_embeds_1LD.detach().float(), persistent=False)
        cross = unet.config.cross_attention_dim
        if prompt_embeds_1LD.shape[-1] != cross:
            raise ValueError(
                f"the empty prompt's embedding has width {prompt_embeds_1LD.shape[-1]}, the UNet's "
                f"cross_attention_dim is {cross}: the text encoder does not belong to this UNet"
            )

    @classmethod
    def from_pretrained(
        cls, path: str, *, vae_input_scale: int = 2, key: str = "teachers.<name>.path"
    ) -> LatentDiffusionTeacher:
        """A local ``StableDiffusionPipeline.save_pretrained`` folder: ``unet/``, ``vae/``, ``scheduler/`` and the
        empty prompt's source (``empty_prompt.safetensors`` or ``text_encoder/`` + ``tokenizer/``)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        folder = Path(path).expanduser()
        missing = [sub for sub in ("unet", "vae", "scheduler") if not (folder / sub).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{key} {str(folder)!r} lacks {missing}: point it at a Stable Diffusion pipeline folder "
                "(StableDiffusionPipeline.save_pretrained, or a downloaded SD 1.4 / 1.5 / 2.1 repository)"
            )
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **_LOAD)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **_LOAD)
        # SD ships a PNDM / DDIM scheduler config; only its training schedule (betas, prediction type) is used
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        embeds, source, prompt_files = empty_prompt_embeds(folder, key=key)
        files = (*_weight_files(folder / "unet"), *_weight_files(folder / "vae"), *prompt_files)
        return cls(
            unet, vae, scheduler, embeds, vae_input_scale=vae_input_scale, path=str(folder),
            prompt_source=source, weight_files=files,
        )  # fmt: skip

    @property
    def tap_root(self) -> nn.Module:
        return self.unet

    def noise_shape(self, resolution: int) -> tuple[int, int, int]:
        seen = resolution * self.vae_input_scale
        if seen % self.vae_factor:
            raise ValueError(
                f"a {resolution} px image x vae_input_scale {self.vae_input_scale} = {seen} px is not divisible by "
                f"the VAE's factor {self.vae_factor}; pick encode.resolution a multiple of "
                f"{self.vae_factor // _gcd(self.vae_factor, self.vae_input_scale)}"
            )
        return (self.latent_channels, seen // self.vae_factor, seen // self.vae_factor)

    def to_diffusion_space(self, x0_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> ``scaling_factor * mean of q(z | resized image)``."""
        x_BCHW = x0_BCHW.float()
        if self.vae_input_scale != 1:
            x_BCHW = F.interpolate(
                x_BCHW, scale_factor=self.vae_input_scale, mode="bicubic", align_corners=False
            )
            x_BCHW = x_BCHW.clamp(-1, 1)
        return self.vae.encode(x_BCHW).latent_dist.mean * self.scaling_factor

    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Epsilon for latents ``x_BCHW`` (the diffusion space: :meth:`noise_shape`), empty-prompt conditioned."""
        cond_BLD = self.prompt_embeds.expand(x_BCHW.shape[0], -1, -1).to(x_BCHW.dtype)
        out_BCHW = self.unet(x_BCHW, t_B, encoder_hidden_states=cond_BLD).sample
        if self.prediction_type == "epsilon":
            return out_BCHW
        abar_B111 = self.alphas_cumprod[t_B].to(out_BCHW.dtype)[:, None, None, None]
        if self.prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (SD 2.1 768)
            return abar_B111.sqrt() * out_BCHW + (1 - abar_B111).sqrt() * x_BCHW
        return (x_BCHW - abar_B111.sqrt() * out_BCHW) / (1 - abar_B111).sqrt()

    def default_taps(self) -> list[TapConfig]:
        """``up_blocks.{0,1,2}.upsamplers.0`` (input: each level's last resnet / attention output) and
        ``up_blocks.3`` (output; SD's last level has no upsampler), as for the pixel diffusers UNet. With
        ``vae_input_scale: 2`` on SD 1.x / 2.x they measure 32, 16, 8, 4 (1280x8x8 .. 320x64x64 at 256 px)."""
        return decoder_taps(self.unet)

    def identity(self) -> dict[str, Any]:
        def plain(config: Any) -> dict[str, Any]:
            out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}
            out.pop("_use_default_values", None)
            return out

        return {
            "kind": "latent-diffusion",
            "path": self.path,
            "unet_config": plain(self.unet.config),
            "vae_config": plain(self.vae.config),
            "prediction_type": self.prediction_type,
            "vae_input_scale": self.vae_input_scale,
            "prompt": {"text": "", "source": self.prompt_source},
            "weights_sha256": self.weights_sha256,
        }


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
