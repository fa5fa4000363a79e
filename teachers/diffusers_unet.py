"""A diffusers ``UNet2DModel`` (e.g. the DDPM this project trains, or google/ddpm-*) as a frozen teacher.

Accepted ``teachers.<name>.path`` values:

* a pipeline folder written by ``DDPMPipeline.save_pretrained``: ``unet/`` and ``scheduler/`` subfolders;
* a bare UNet folder (``UNet2DModel.save_pretrained``: ``config.json`` + weights) with the scheduler's
  ``scheduler_config.json`` beside them (``DDPMScheduler.save_pretrained`` into the same folder);
* a Hugging Face hub id (needs network access): the pipeline layout is tried first, then the bare layout
  (google/ddpm-cifar10-32 style repositories keep the UNet and the scheduler config at the top level).

diffusers is imported only when a teacher is loaded, so configs and the CLI stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from teachers.base import Teacher
from teachers.config import TapConfig

if TYPE_CHECKING:  # imported lazily at load time
    from diffusers import SchedulerMixin, UNet2DModel

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


# Plain loading: the low-memory path needs `accelerate` (not a dependency) and would only warn without it.
_LOAD = {"low_cpu_mem_usage": False}


def decoder_taps(unet: Any) -> list[TapConfig]:
    """The default taps of a diffusers UNet (pixel or latent): the input of ``up_blocks.{i}.upsamplers.0`` (each
    decoder level's last resnet / attention output, before upsampling) for the four lowest-resolution levels, or the
    block's output where a level has no upsampler. Strides written here are replaced by the measured ones."""
    if len(unet.up_blocks) < 4:
        raise ValueError(
            f"the UNet has {len(unet.up_blocks)} decoder levels; the default taps need 4 "
            "(set teachers.<name>.taps explicitly)"
        )
    taps = []
    for i, stride in enumerate((32, 16, 8, 4)):
        if unet.up_blocks[i].upsamplers is not None:
            taps.append(TapConfig(module=f"up_blocks.{i}.upsamplers.0", point="input", stride=stride))
        else:
            taps.append(TapConfig(module=f"up_blocks.{i}", point="output", stride=stride))
    return taps


class DiffusersTeacher(Teacher):
    """Wraps a ``UNet2DModel`` and its DDPM noise schedule; converts the model's prediction type to epsilon."""

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        *,
        path: str = "",
        weight_files: Sequence[Path] = (),
    ) -> None:
        super().__init__()
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
            raise ValueError(
                "class-conditional UNet2DModel teachers are not supported (no class label to give)"
            )
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
        size = unet.config.sample_size
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise ValueError(f"non-square sample_size {tuple(size)}: teachers encode square center crops")
            size = size[0]
        self.unet = unet
        self.resolution = int(size)
        self.prediction_type = prediction_type
        self.path = path
        self.scheduler_config = dict(scheduler.config)
        self.weight_files = tuple(weight_files)
        # The schedule the model was trained with: diffusers computes it in float32 (DDPMScheduler.add_noise uses
        # exactly these values); stored as float64 like every teacher's buffer.
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.detach().to(torch.float64), persistent=False
        )

    @classmethod
    def from_pretrained(cls, path: str, *, key: str = "teachers.<name>.path") -> DiffusersTeacher:
        """Load a local ``save_pretrained`` folder (pipeline or bare UNet + scheduler config) or a hub id.

        ``key`` is the config key ``path`` came from, for the error messages."""
        from diffusers import DDPMScheduler, UNet2DModel

        folder = Path(path).expanduser()
        if folder.is_dir():
            if (folder / "unet").is_dir() and (folder / "scheduler").is_dir():
                unet = UNet2DModel.from_pretrained(folder, subfolder="unet", **_LOAD)
                scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
                weights_dir = folder / "unet"
            elif (folder / "config.json").is_file() and (folder / "scheduler_config.json").is_file():
                unet = UNet2DModel.from_pretrained(folder, **_LOAD)
                scheduler = DDPMScheduler.from_pretrained(folder)
                weights_dir = folder
            else:
                raise FileNotFoundError(
                    f"{key} {str(folder)!r} is neither a pipeline folder (unet/ + scheduler/) nor a UNet "
                    "folder with config.json and scheduler_config.json; save the teacher with save_pretrained"
                )
            return cls(unet, scheduler, path=str(folder), weight_files=_weight_files(weights_dir))
        if folder.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
            raise FileNotFoundError(f"{key} {path!r} does not exist (and is not a hub id 'owner/name')")
        if Path(path.split("/")[0]).is_dir():  # e.g. assets/demo-teacher before the teacher is trained
            raise FileNotFoundError(
                f"{key} {path!r} does not exist; its first component is a local folder, so it is not tried "
                "as a hub id. Create the teacher there (save_pretrained) or fix the path."
            )
        errors = []
        for subfolders in (("unet", "scheduler"), (None, None)):  # pipeline layout, then bare layout
            try:
                unet = UNet2DModel.from_pretrained(path, subfolder=subfolders[0], **_LOAD)
                scheduler = DDPMScheduler.from_pretrained(path, subfolder=subfolders[1])
            except OSError as err:  # diffusers reports a missing file / unreachable hub as OSError
                errors.append(f"{'pipeline' if subfolders[0] else 'bare'} layout: {err}")
                continue
            return cls(unet, scheduler, path=path)
        raise FileNotFoundError(
            f"{key} {path!r} is not a local folder and could not be loaded as a hub id:\n  "
            + "\n  ".join(errors)
        )

    @classmethod
    def debug(
        cls,
        resolution: int = 32,
        *,
        seed: int = 0,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
    ) -> DiffusersTeacher:
        """A tiny random-init teacher for tests and debug runs: 4 levels, channels (8, 16, 16, 32), one attention."""
        from diffusers import DDPMScheduler, UNet2DModel

        torch.manual_seed(seed)
        unet = UNet2DModel(
            sample_size=resolution,
            block_out_channels=(8, 16, 16, 32),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, prediction_type=prediction_type)
        return cls(unet, scheduler, path=f"debug:{resolution}:{seed}")

    @property
    def tap_root(self) -> nn.Module:
        return self.unet

    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        out_BCHW = self.unet(x_BCHW, t_B).sample
        if self.prediction_type == "epsilon":
            return out_BCHW
        abar_B111 = self.alphas_cumprod[t_B].to(out_BCHW.dtype)[:, None, None, None]
        if self.prediction_type == "v_prediction":  # v = sqrt(abar) eps - sqrt(1 - abar) x0
            return abar_B111.sqrt() * out_BCHW + (1 - abar_B111).sqrt() * x_BCHW
        return (x_BCHW - abar_B111.sqrt() * out_BCHW) / (1 - abar_B111).sqrt()  # "sample": out = x0

    def default_taps(self) -> list[TapConfig]:
        """The last block of each of the four lowest-resolution decoder levels, before its upsampler.

        ``up_blocks.{i}`` for i = 0..3 (lowest resolution first); a level with an upsampler is read at the
        upsampler's input, a level without one (the model's final level) at the block's output. The strides
        written here (32, 16, 8, 4: a six-level UNet such as the demo teacher) are replaced by the measured ones
        (:class:`~teachers.base.Teacher` wraps every family's ``default_taps``): 8, 4, 2, 1 on a four-level UNet
        (:meth:`debug`), whose lowest decoder level is 4x4 at 32 px. Assumed strides would label that model's
        32x32 map "s4" and distill it into the student's 8x8 one.
        """
        return decoder_taps(self.unet)

    def identity(self) -> dict[str, Any]:
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.unet.config.items()}
        config.pop("_use_default_values", None)
        return {
            "kind": "diffusers",
            "path": self.path,
            "config": config,
            "prediction_type": self.prediction_type,
            "weights_sha256": self.weights_sha256,
        }


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a save_pretrained folder, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    return files
