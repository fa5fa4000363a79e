"""Teacher diagnostics: how stochastic and how flip-equivariant are a teacher's features?

Two properties decide what a feature bank can save:

* **draw-to-draw**: the cosine between two noise draws of the same image. A bank stores K draws of a random
  variable; the lower this is, the more a student learns from fresh draws (or from the mean of many);
* **flip equivariance**: the cosine between ``mirror(f(x))`` and ``f(mirror(x))``. A bank that stores only the
  unflipped view and mirrors feature maps at read time is only as good as this. Measured with the same noise
  (``eps`` mirrored with the image: what encode does for flipped rows, so the gap is the network's alone) and with
  fresh noise (the gap a student sees when the flipped view is encoded with a new draw; compare it with
  draw-to-draw: an equivariant teacher gives the same figure).

Everything works on an ``encode(x0_BCHW, eps_BCHW) -> {level: feats_BChw}`` callable, e.g. a
:class:`teachers.encoding.TeacherEncoder` in ``noise`` mode, so any teacher the pipeline supports is measured the
same way (``dreamteacher teacher diagnose``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from teachers.config import TeacherConfig
from teachers.encoding import make_noise
from teachers.provenance import Encoding

EncodeFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``encode(x0_BCHW in [-1, 1], eps_BCHW) -> {level: (B, C, h, w) float32}``."""


def cosine_per_level(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over the batch of the cosine between two feature maps flattened over (C, h, w), per level."""
    if set(a) != set(b):
        raise ValueError(f"levels differ: {sorted(a)} vs {sorted(b)}")
    return {
        name: float(F.cosine_similarity(a[name].flatten(1).float(), b[name].flatten(1).float(), dim=1).mean())
        for name in sorted(a)
    }


def mirror(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each map flipped along W (the last axis)."""
    return {name: f.flip(-1) for name, f in feats.items()}


def flip_and_noise_diagnostics(
    encode: EncodeFn, x0_BCHW: torch.Tensor, seeds: list[int], noise_shape: tuple[int, ...] | None = None
) -> dict[str, dict[str, float]]:
    """Per level: ``draw_to_draw``, ``flip_same_noise``, ``flip_fresh_noise`` cosines (1.0 = identical).

    ``seeds``: one per image; a second, independent draw uses ``seed + 1_000_003``. Noise comes from
    :func:`teachers.encoding.make_noise`, so figures are reproducible on any device. ``noise_shape``: (C, H, W) of
    one row's noise, default the image's (a latent teacher's is its latent's; mirroring it mirrors the latent).
    """
    shape = tuple(noise_shape or x0_BCHW.shape[1:])
    no_flip = [False] * len(seeds)
    eps_a = make_noise(seeds, no_flip, shape).to(x0_BCHW.device)
    eps_b = make_noise([s + 1_000_003 for s in seeds], no_flip, shape).to(x0_BCHW.device)
    f_a = encode(x0_BCHW, eps_a)
    f_b = encode(x0_BCHW, eps_b)
    mirrored_x = x0_BCHW.flip(-1)
    f_flip_same = encode(mirrored_x, eps_a.flip(-1))
    f_flip_fresh = encode(mirrored_x, eps_b)
    reference = mirror(f_a)
    figures = {
        "draw_to_draw": cosine_per_level(f_a, f_b),
        "flip_same_noise": cosine_per_level(reference, f_flip_same),
        "flip_fresh_noise": cosine_per_level(reference, f_flip_fresh),
    }
    return {name: {key: values[name] for key, values in figures.items()} for name in sorted(f_a)}


def format_diagnostics(results: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per level."""
    lines = [
        "| level | draw-to-draw cos | flip, same noise cos | flip, fresh noise cos |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['draw_to_draw']:.4f} | {r['flip_same_noise']:.4f} | {r['flip_fresh_noise']:.4f} |"
        )
    return "\n".join(lines)


def run_teacher_diagnostics(
    teacher_cfg: TeacherConfig,
    encoding: Encoding,
    images_dir: str | Path,
    *,
    name: str = "",
    limit: int = 32,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, dict[str, float]]:
    """:func:`flip_and_noise_diagnostics` of a configured teacher on the first ``limit`` images of a folder."""
    from sources.datasets import DatasetConfig
    from sources.images import list_images, load_image
    from teachers.encoding import row_seed
    from teachers.provenance import build_encoder
    from training.runtime import resolve_device

    if encoding.mode != "noise":
        raise ValueError("teacher diagnostics measure noise draws: use encode.mode=noise")
    encoder = build_encoder(teacher_cfg, encoding, resolve_device(device, "--device"), name=name)
    records = list_images("diagnose", DatasetConfig(root=str(images_dir), layout="folder", limit=limit))
    images, seeds = [], []
    for record in records:
        image, _ = load_image(record, encoder.resolution)
        if image is not None:
            images.append(torch.from_numpy(image))
            seeds.append(row_seed(seed, record.key, 0))
    if not images:
        raise ValueError(f"no readable image below {images_dir}")
    x0 = torch.stack(images).float() / 127.5 - 1.0
    return flip_and_noise_diagnostics(
        lambda x, e: encoder(x, e), x0.to(encoder.device), seeds, encoder.noise_shape
    )
