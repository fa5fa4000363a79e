"""GAN teachers: a frozen generator whose intermediate features are the targets of a *synthesized* bank.

A GAN cannot encode a real image, so it does not predict epsilon: its read-out is
``synthesize(z, class, truncation) -> (image, features at the taps)`` (:class:`teachers.synthesis.GANSynthesizer`),
and the image it generated is the student's input for that row. Taps, their dry run and their measured strides are
the same machinery as for the diffusion teachers (:mod:`teachers.base`); only what one forward takes differs
(:meth:`GANTeacher.dry_run_inputs`: a latent and a class instead of an image and a timestep).
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teachers.base import Teacher
from teachers.biggan import CONFIG_NAME, WEIGHTS_NAME, BigGAN
from teachers.config import TapConfig

DEFAULT_STRIDES = (32, 16, 8, 4)


class GANTeacher(Teacher):
    """A class-conditional generator ``image_B3HW in [-1, 1] = G(z_BZ, labels_B)`` at ``truncation``."""

    z_dim: int
    num_classes: int
    truncation: float
    synthesizes = True
    """Banks of this family are synthesized (``teachers.registry.synthesizes``), not encoded from images."""

    @abc.abstractmethod
    def generate(self, z_BZ: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [-1, 1] for latents ``z_BZ`` and integer class labels ``labels_B``."""

    def forward(self, z_BZ: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.generate(z_BZ, labels_B)

    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        raise TypeError(
            f"{type(self).__name__} is a GAN: it synthesizes images and cannot encode one (no epsilon); "
            "`dreamteacher encode` with a gan teacher writes a synthesized bank, and distill uses its stored targets"
        )

    def dry_run_inputs(self, resolution: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        if resolution != self.resolution:
            raise ValueError(
                f"a GAN generates {self.resolution} px images; its taps cannot be measured at {resolution} px "
                "(leave encode.resolution at 0)"
            )
        return torch.zeros(1, self.z_dim, device=device), torch.zeros(1, dtype=torch.long, device=device)


class BigGANTeacher(GANTeacher):
    """BigGAN-deep (:mod:`teachers.biggan`) from a pytorch-pretrained-biggan checkpoint folder."""

    def __init__(self, model: BigGAN, *, truncation: float = 1.0, path: str = "") -> None:
        super().__init__()
        if not 0.0 < truncation <= 1.0:
            raise ValueError(f"BigGAN truncation must be in (0, 1], got {truncation}")
        self.model = model
        self.truncation = float(truncation)
        self.path = path
        cfg = model.config
        self.resolution = cfg.output_dim
        self.z_dim = cfg.z_dim
        self.num_classes = cfg.num_classes
        if path:
            self.weight_files = (Path(path) / WEIGHTS_NAME,)

    @classmethod
    def from_folder(
        cls, folder: str | Path, *, truncation: float, key: str = "teachers.<name>.path"
    ) -> BigGANTeacher:
        return cls(BigGAN.from_folder(folder, key=key), truncation=truncation, path=str(folder))

    @property
    def tap_root(self) -> nn.Module:
        return self.model

    def generate(self, z_BZ: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        # scatter, not F.one_hot: one_hot reads the labels' values, which the meta-device tap dry run cannot
        one_hot_BK = torch.zeros(labels_B.shape[0], self.num_classes, dtype=z_BZ.dtype, device=z_BZ.device)
        one_hot_BK.scatter_(1, labels_B.long()[:, None], 1.0)
        return self.model(z_BZ, one_hot_BK, self.truncation)

    def default_taps(self) -> list[TapConfig]:
        """The last generator module at each of the feature sizes R/32, R/16, R/8, R/4.

        At each resolution the generator finishes that scale's features in its last block (the next one
        up-samples), like the diffusion teachers' pre-upsample taps. biggan-deep-128: ``generator.layers.{0,2,4,6}``
        (4, 8, 16, 32 px); -256: ``layers.{2,4,6,9}`` (8 .. 64 px; index 8 is the attention layer, so the last
        64 px block is 9); -512: ``layers.{4,6,9,11}``. Strides are then measured by the base class.
        """
        sizes = self.model.config.stage_sizes
        taps = []
        for stride in DEFAULT_STRIDES:
            at = [i for i, size in enumerate(sizes) if size * stride == self.resolution]
            if at:
                taps.append(TapConfig(module=f"generator.layers.{at[-1]}", point="output", stride=stride))
        if not taps:
            raise ValueError(
                f"this {self.resolution} px BigGAN has no stage at strides {list(DEFAULT_STRIDES)}; set "
                f"teachers.<name>.taps (stage sizes: {sizes})"
            )
        return taps

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "gan",
            "architecture": "biggan-deep",
            "path": self.path,
            "config": self.model.config.as_dict(),
            "truncation": self.truncation,
            "weights_sha256": self.weights_sha256,
        }


def load_gan(path: str, *, truncation: float, key: str) -> GANTeacher:
    """The GAN in ``path``: a pytorch-pretrained-biggan folder (``config.json`` + ``pytorch_model.bin``).

    Pickled generators (NVIDIA's StyleGAN ``.pkl``) are refused: unpickling runs arbitrary code."""
    folder = Path(path)
    if folder.suffix == ".pkl":
        raise ValueError(
            f"{key} is a pickle ({path}); pickles execute code when loaded and are never read. Convert it to a "
            "state dict in a trusted environment (torch.save(G.state_dict())) and use a supported family"
        )
    if not (folder / CONFIG_NAME).is_file() and folder.is_dir():
        raise FileNotFoundError(f"{key}: {path} has no {CONFIG_NAME}; point it at a BigGAN checkpoint folder")
    return BigGANTeacher.from_folder(folder, truncation=truncation, key=key)
