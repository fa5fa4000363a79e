"""The GAN read-out: draw a row's (latent, class), generate its image, read the generator's features at the taps.

A synthesized bank row ``r`` is a function of (global seed, r) alone: its seed is
``row_seed(global_seed, synth_key(r), 0)`` and a per-row CPU ``torch.Generator`` draws, in this order, the latent
``z = truncation * N(0, I)`` cut at +-2 (pytorch-pretrained-biggan's ``truncated_noise_sample``; here by rejection,
so no scipy) and the class, uniform over ``classes``. So any shard, process or device reproduces any row, and a
resumed encode writes the same bytes. The image is stored as uint8 (``round((x + 1) * 127.5)``), exactly the pixels
the student is given; the features are those of the float image the generator produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from teachers.base import FeatureTaps, TapInfo, autocast_for, discover_taps
from teachers.biggan import truncated_normal
from teachers.config import TapConfig
from teachers.encoding import DTYPE_NAMES, row_seed
from teachers.gan import GANTeacher

SYNTH_SEED_RULE = (
    "row r: seed = teachers.encoding.row_seed(seed, 'synth/<r>', 0); a CPU torch.Generator(seed) draws z = "
    "truncation * N(0, I) cut at +-2 (teachers.biggan.truncated_normal), then the class index into `classes` "
    "(torch.randint)"
)
SYNTH_PREPROCESSING = (
    "generated image in [-1, 1] -> uint8 round((x + 1) * 127.5), clamped; x0 = uint8 / 127.5 - 1"
)


def synth_key(row: int) -> str:
    return f"synth/{int(row):09d}"


@dataclass(frozen=True)
class SynthRows:
    """The drawn inputs of some rows: what each generated image is a function of."""

    seed_B: list[int]
    z_BZ: torch.Tensor
    labels_B: torch.Tensor


def draw_rows(
    rows: Sequence[int], *, global_seed: int, z_dim: int, truncation: float, classes: Sequence[int]
) -> SynthRows:
    """(seed, z, class) of each bank row, on CPU, independent of batching (:data:`SYNTH_SEED_RULE`)."""
    if not classes:
        raise ValueError("no classes to draw from")
    seeds, zs, labels = [], [], []
    for row in rows:
        seed = row_seed(global_seed, synth_key(row), 0)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        zs.append(truncated_normal(gen, (z_dim,), truncation))
        labels.append(int(classes[int(torch.randint(len(classes), (1,), generator=gen))]))
        seeds.append(seed)
    z_BZ = torch.stack(zs) if zs else torch.empty(0, z_dim)
    return SynthRows(seeds, z_BZ, torch.tensor(labels, dtype=torch.long))


def to_uint8(image_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 on CPU, the inverse of ``sources.images.to_model_range`` up to rounding."""
    return ((image_BCHW.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


class GANSynthesizer:
    """One GAN read-out: rows -> (uint8 images, features at the taps). The encode stage's counterpart of
    :class:`teachers.encoding.TeacherEncoder` for teachers that synthesize (same ``taps_info`` / ``resolution`` /
    ``device`` / ``teacher`` attributes, so the bank spec is built the same way)."""

    def __init__(
        self,
        teacher: GANTeacher,
        taps: list[TapConfig],
        *,
        classes: Sequence[int],
        seed: int,
        device: torch.device | str,
        dtype_name: Literal["bf16", "fp16", "fp32"],
    ) -> None:
        if dtype_name not in DTYPE_NAMES:
            raise ValueError(f"teacher.dtype {dtype_name!r}: valid choices are {', '.join(DTYPE_NAMES)}")
        classes = list(classes) or list(range(teacher.num_classes))
        bad = [c for c in classes if not 0 <= c < teacher.num_classes]
        if bad:
            raise ValueError(f"classes {bad[:5]} are outside the generator's [0, {teacher.num_classes})")
        self.teacher = teacher
        self.classes = classes
        self.seed = int(seed)
        self.taps = list(taps)
        self.resolution = teacher.resolution
        self.device = torch.device(device)
        self.dtype_name = dtype_name
        self.taps_info: list[TapInfo] = discover_taps(teacher, self.taps, self.resolution, self.device)
        self._hooks = FeatureTaps(teacher, self.taps)

    def draw(self, rows: Sequence[int]) -> SynthRows:
        t = self.teacher
        return draw_rows(
            rows, global_seed=self.seed, z_dim=t.z_dim, truncation=t.truncation, classes=self.classes
        )

    @torch.inference_mode()
    def synthesize(
        self, z_BZ: torch.Tensor, labels_B: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(images uint8 (B, 3, R, R) on CPU, {level: (B, C, h, w) float32 on the device}) at the teacher's
        truncation."""
        with autocast_for(self.device, self.dtype_name), self._hooks as captured:
            image_BCHW = self.teacher.generate(z_BZ.to(self.device), labels_B.to(self.device))
        feats = {name: f.float().contiguous() for name, f in captured.features.items()}
        return to_uint8(image_BCHW), feats

    def __call__(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        raise TypeError(
            "a GAN teacher cannot encode images: its bank's targets are the features stored when the images were "
            "synthesized (use the bank's stored targets, not online re-encoding)"
        )
