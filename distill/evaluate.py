"""Held-out feature fidelity: how close are a student's predictions to the teacher's *expected* features?

The student is trained on single noise draws (from the bank, or fresh online), but under the MSE loss its optimum
is the expectation of the teacher feature over the noise. So the score compares the student + regressor's
prediction on images that are in no bank with the teacher's features averaged over M fresh draws (M = 16 by
default), per level:

* ``mse``: mean squared error against the whitened expected feature (the loss's own scale: 1.0 = predicting 0);
* ``cos``: cosine between the prediction and the whitened expected feature, flattened over (C, h, w);
* ``at``: the attention-transfer distance (``distill.losses.attention_transfer``) to it.

The same three figures between each single draw and the M-draw mean are the teacher's own **noise floor**: what a
student that reproduced one draw perfectly would score. (The M-draw mean itself carries 1/M of the draw variance,
so the floor is slightly optimistic for small M.)

``dreamteacher distill eval RUN --images DIR`` scores any distill run; the cache-cost study scores every variant
with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.losses import WhitenAxes, attention_transfer, whiten

EncodeFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``encode(x0_BCHW in [-1, 1], eps_BCHW) -> {level: (B, C, h, w) float32}`` (a noise-mode TeacherEncoder)."""

METRICS = ("mse", "cos", "at")


def fidelity_terms(
    preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], whiten_axes: WhitenAxes
) -> dict[str, dict[str, float]]:
    """Per level: ``mse``, ``cos``, ``at`` of ``preds`` against the whitened ``targets`` (batch means).

    A target whose size differs from the prediction's is resized to it (bilinear), as the training step does.
    """
    out = {}
    for name in sorted(targets):
        pred = preds[name].float()
        target = targets[name].float()
        if target.shape[-2:] != pred.shape[-2:]:
            target = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
        white = whiten(target, whiten_axes)
        out[name] = {
            "mse": float(F.mse_loss(pred, white)),
            "cos": float(F.cosine_similarity(pred.flatten(1), white.flatten(1), dim=1).mean()),
            "at": float(attention_transfer(pred, white)),
        }
    return out


def expected_features(
    encode: EncodeFn,
    x0_BCHW: torch.Tensor,
    seeds_BM: Sequence[Sequence[int]],
    noise_shape: Sequence[int] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The mean over M draws (``seeds_BM[b][m]`` is image b's m-th noise seed) and the M single draws.

    ``noise_shape``: (C, H, W) of one row's noise, default the image's (a latent teacher's is its latent's)."""
    from teachers.encoding import make_noise

    draws = len(seeds_BM[0])
    shape = tuple(noise_shape or x0_BCHW.shape[1:])
    singles = []
    for m in range(draws):
        eps = make_noise([int(s[m]) for s in seeds_BM], [False] * len(seeds_BM), shape).to(x0_BCHW.device)
        singles.append({k: v.float() for k, v in encode(x0_BCHW, eps).items()})
    mean = {name: torch.stack([s[name] for s in singles]).mean(0) for name in singles[0]}
    return mean, singles


def noise_floor(
    mean: dict[str, torch.Tensor], singles: list[dict[str, torch.Tensor]], whiten_axes: WhitenAxes
) -> dict[str, dict[str, float]]:
    """The fidelity of each whitened single draw to the M-draw mean, averaged over the draws."""
    per_draw = [
        fidelity_terms({k: whiten(v, whiten_axes) for k, v in s.items()}, mean, whiten_axes) for s in singles
    ]
    return {
        name: {m: sum(d[name][m] for d in per_draw) / len(per_draw) for m in METRICS} for name in per_draw[0]
    }


@dataclass
class FidelityReport:
    """Image-weighted means over the held-out set, per level, plus their mean over levels."""

    images: int
    draws: int
    student: dict[str, dict[str, float]]
    floor: dict[str, dict[str, float]]

    def summary(self) -> dict[str, float]:
        levels = list(self.student)
        out = {}
        for m in METRICS:
            out[m] = sum(self.student[n][m] for n in levels) / len(levels)
            out[f"floor_{m}"] = sum(self.floor[n][m] for n in levels) / len(levels)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "draws": self.draws, "student": self.student, "floor": self.floor,
                "summary": self.summary()}  # fmt: skip

    def format(self) -> str:
        lines = [
            f"held-out fidelity over {self.images} images, expected features from {self.draws} draws",
            "| level | mse | cos | at | floor mse | floor cos | floor at |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in self.student:
            s, f = self.student[name], self.floor[name]
            lines.append(
                f"| {name} | {s['mse']:.4f} | {s['cos']:.4f} | {s['at']:.4f} | {f['mse']:.4f} | {f['cos']:.4f} "
                f"| {f['at']:.4f} |"
            )
        return "\n".join(lines)


def _accumulate(total: dict, part: dict, weight: int) -> None:
    for name, values in part.items():
        slot = total.setdefault(name, dict.fromkeys(METRICS, 0.0))
        for m in METRICS:
            slot[m] += values[m] * weight


def score(
    predict: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    encode: EncodeFn,
    batches: Sequence[tuple[torch.Tensor, Sequence[Sequence[int]]]],
    whiten_axes: WhitenAxes,
    noise_shape: Sequence[int] | None = None,
) -> FidelityReport:
    """Fidelity of ``predict(images_u8_BCHW)`` over ``batches`` of (uint8 images, per-image draw seeds)."""
    student: dict[str, dict[str, float]] = {}
    floor: dict[str, dict[str, float]] = {}
    images = 0
    for images_u8, seeds_BM in batches:
        x0 = images_u8.float() / 127.5 - 1.0
        mean, singles = expected_features(encode, x0, seeds_BM, noise_shape)
        with torch.no_grad():
            preds = predict(images_u8)
        n = images_u8.shape[0]
        _accumulate(student, fidelity_terms(preds, mean, whiten_axes), n)
        _accumulate(floor, noise_floor(mean, singles, whiten_axes), n)
        images += n
    if not images:
        raise ValueError("no held-out images to score")
    normalise = lambda d: {k: {m: v / images for m, v in vals.items()} for k, vals in d.items()}  # noqa: E731
    return FidelityReport(images=images, draws=len(batches[0][1][0]), student=normalise(student),
                          floor=normalise(floor))  # fmt: skip


def evaluate_run(
    exp_dir: str | Path,
    images_dir: str | Path,
    teachers: dict[str, Any],
    *,
    draws: int = 16,
    seed: int = 12345,
    batch_size: int = 16,
    limit: int = 0,
    device: str = "cpu",
) -> FidelityReport:
    """Score the distill run in ``exp_dir`` on the images below ``images_dir`` (none of them in its bank).

    The teacher and its read-out are the bank's recorded provenance (rebuilt with the weights' location from
    ``teachers``, this machine's config entries); the student + regressor come from the run's ``checkpoint.pt``.
    Results are written to ``<exp_dir>/fidelity.json``.
    """
    from bank import Bank
    from configlib import atomic_write_text, from_mapping, read_yaml
    from distill.inputs import DistillInputs
    from distill.model import DistillNet
    from distill.student import build_student
    from distill.train import check_bank_fits
    from sources.datasets import DatasetConfig
    from sources.images import list_images, load_image
    from teachers.encoding import row_seed
    from teachers.provenance import Provenance
    from training.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from training.runtime import resolve_device

    exp_dir = Path(exp_dir)
    inputs = from_mapping(DistillInputs, read_yaml(exp_dir / "config.yaml"))
    dcfg = inputs.distill
    dev = resolve_device(device, "--device")
    # 1. The bank's levels and teacher read-out (noise mode: expected features need fresh draws).
    bank = Bank.open(dcfg.bank)
    levels = check_bank_fits(bank, dcfg)
    provenance = Provenance.from_dict(bank.spec.attributes)
    if provenance.encoding.mode != "noise":
        raise ValueError(
            f"the bank was encoded with mode={provenance.encoding.mode}; fidelity needs noise draws"
        )
    encoder = provenance.rebuild_encoder(teachers, dev, levels=levels, purpose="distill eval")
    # 2. The trained student + regressor.
    state = load_checkpoint(exp_dir / CHECKPOINT_NAME)["model"]
    num_classes = int(state["label_head.weight"].shape[0]) if "label_head.weight" in state else 0
    net = DistillNet(
        build_student(dcfg.student.name),
        {lv.name: lv.channels for lv in bank.levels if lv.name in levels},
        channels=dcfg.regressor.channels,
        pool_scales=dcfg.regressor.pool_scales,
        num_classes=num_classes,
    )
    net.load_state_dict(state)
    net.to(dev).eval()
    # 3. Held-out images at the bank's resolution, M seeds per image from (seed, key, draw).
    records = list_images("held-out", DatasetConfig(root=str(images_dir), layout="folder", limit=limit))
    res = provenance.encoding.resolution
    batches = []
    for start in range(0, len(records), batch_size):
        chunk, images = [], []
        for record in records[start : start + batch_size]:
            image, reason = load_image(record, res)
            if image is not None:
                chunk.append(record)
                images.append(torch.from_numpy(image))
        if images:
            seeds = [[row_seed(seed, r.key, m) for m in range(draws)] for r in chunk]
            batches.append((torch.stack(images).to(dev), seeds))

    def predict(images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        out = net(net.normalize(images_u8))
        return {k: v for k, v in out.items() if k in levels}

    report = score(predict, lambda x, e: encoder(x, e), batches, dcfg.loss.whiten, encoder.noise_shape)
    atomic_write_text(exp_dir / "fidelity.json", json.dumps(report.as_dict(), indent=2))
    return report
