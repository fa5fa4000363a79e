"""Teacher diagnostic for the demo: how much class information do the teacher's features carry?

A per-pixel linear classifier (multinomial logistic regression) is fitted on the few-label training split and
scored (mIoU) on its test split, for four feature sets at the stride-4 grid (16x16 for 64x64 images):

* ``teacher``: the trained teacher's four decoder levels (T = the dataset's noise step, one noise draw), each
  upsampled to stride 4 and concatenated;
* ``random teacher``: the same UNet architecture with random weights (what the architecture alone gives);
* ``pixels``: the image's RGB, 4x4 average-pooled to the same grid (what colour alone gives);
* ``pixels 4x4 patch``: the 48 raw values of each 4x4 pixel block (colour + local texture, no learning).

If the trained teacher does not beat the random one and the pixels, distilling it cannot help the student.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from encode.inputs import EncodeInputs
from sources.datasets import DatasetConfig, ensure_available
from sources.images import to_rgb
from teachers.base import FeatureTaps
from teachers.encoding import q_sample
from teachers.registry import build_teacher, resolve_taps

STRIDE = 4


def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``(N, 3, H, W)`` and int64 labels ``(N, H, W)`` of a fewshot-layout split."""
    images, labels = [], []
    for png in sorted((root / split).glob("*.png")):
        images.append(np.asarray(to_rgb(Image.open(png))).transpose(2, 0, 1))
        labels.append(np.load(png.with_suffix(".npy"), allow_pickle=False).astype(np.int64))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


@torch.inference_mode()
def teacher_features(
    teacher: torch.nn.Module, taps: list, images_u8: torch.Tensor, t: int, seed: int
) -> torch.Tensor:
    """Teacher decoder levels at step ``t``, upsampled to stride 4 and concatenated: ``(N, C_total, H/4, W/4)``."""
    x0 = images_u8.float() / 127.5 - 1.0
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = q_sample(x0, t, eps, teacher.alphas_cumprod)
    size = (images_u8.shape[-2] // STRIDE, images_u8.shape[-1] // STRIDE)
    with FeatureTaps(teacher, taps) as captured:
        teacher.predict_eps(x_t, torch.full((x0.shape[0],), t, dtype=torch.long))
    levels = [
        F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False)
        for f in captured.features.values()
    ]
    return torch.cat(levels, dim=1)


def pixel_features(images_u8: torch.Tensor, patch: bool) -> torch.Tensor:
    x = images_u8.float() / 255.0
    if not patch:
        return F.avg_pool2d(x, STRIDE)  # (N, 3, H/4, W/4)
    n, c, h, w = x.shape
    return F.pixel_unshuffle(x, STRIDE)  # (N, 3*16, H/4, W/4): each 4x4 block's raw values


def linear_probe_miou(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      num_classes: int, steps: int = 300) -> float:  # fmt: skip
    """Per-pixel logistic regression (features standardised on the train split) -> test mIoU (%) at stride 4."""

    def pixels(x: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N*h*w, C)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def labels(y: torch.Tensor) -> torch.Tensor:  # nearest-neighbour label at each stride-4 cell centre
        return y[:, STRIDE // 2 :: STRIDE, STRIDE // 2 :: STRIDE].reshape(-1)

    xtr, xte = pixels(train_x), pixels(test_x)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr, yte = labels(train_y), labels(test_y)
    torch.manual_seed(0)
    linear = torch.nn.Linear(xtr.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(xtr), ytr) + 1e-4 * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        pred = linear(xte).argmax(1)
    ious = []
    for k in range(num_classes):
        union = ((pred == k) | (yte == k)).sum().item()
        if union:
            ious.append(((pred == k) & (yte == k)).sum().item() / union)
    return 100.0 * float(np.mean(ious))


def run_probe(encode: EncodeInputs, data: str, dataset: DatasetConfig) -> dict[str, float]:
    """Linear-probe mIoU (%) of the feature sets in the module docstring on ``data`` (a fewshot-layout set).

    The teacher and T are the resolved encode inputs' (``dreamteacher.resolve``), i.e. what the bank used.
    """
    from diffusers import DDPMScheduler

    from teachers.diffusers_unet import DiffusersTeacher

    root = ensure_available(data, dataset)
    num_classes = len((root / "classes.txt").read_text().split())
    (train_u8, train_y), (test_u8, test_y) = _load_split(root, "train"), _load_split(root, "test")
    t, tcfg = encode.encode.t, encode.teacher
    teacher = build_teacher(tcfg, "cpu", name=encode.encode.teacher)
    taps = resolve_taps(teacher, tcfg)
    # 1. The same architecture with random weights (the trained teacher's config, re-initialised).
    torch.manual_seed(0)
    random_unet = type(teacher.unet).from_config(teacher.unet.config)
    random_teacher = DiffusersTeacher(random_unet, DDPMScheduler.from_config(teacher.scheduler_config)).eval()
    results = {}
    for name, model in (("teacher", teacher), ("random teacher", random_teacher)):
        feats_tr = teacher_features(model, taps, train_u8, t, seed=1)
        feats_te = teacher_features(model, taps, test_u8, t, seed=2)
        results[name] = linear_probe_miou(feats_tr, train_y, feats_te, test_y, num_classes)
    for name, patch in (("pixels", False), ("pixels 4x4 patch", True)):
        results[name] = linear_probe_miou(
            pixel_features(train_u8, patch), train_y, pixel_features(test_u8, patch), test_y, num_classes
        )
    return results
