"""Semantic-segmentation samples shared by ADE20K and the label-efficient sets: reading, checks, augmentation.

The training pipeline is mmsegmentation's ADE20K one: random rescale of a (long, short) bound by a ratio in
[0.5, 2.0], random crop with cat_max_ratio, horizontal flip, photometric distortion, normalisation, pad to the crop.
Why not torchvision.transforms.v2: it has no ratio-of-bound rescale or cat_max_ratio crop, and its
RandomPhotometricDistort also permutes channels, which mmseg's PhotoMetricDistortion does not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from finetune.config import SegAugConfig
from sources.segmentation import IGNORE, SegPair, load_pair

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def rescale_size(height: int, width: int, bound: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= bound[0] and short edge <= bound[1]."""
    long_bound, short_bound = max(bound), min(bound)
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_pair(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def random_crop(image, label, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """Crop ``crop`` x ``crop`` (or the whole side when smaller); re-draw up to 10 times for class balance."""
    h, w = label.shape
    ch, cw = min(crop, h), min(crop, w)
    for _ in range(10):
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        window = label[top : top + ch, left : left + cw]
        counts = torch.bincount(window[window != IGNORE].flatten(), minlength=1)
        counts = counts[counts > 0]
        if cat_max_ratio >= 1.0 or (len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio):
            break
    return image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on 0..255 floats: brightness, contrast (before or after), saturation, hue."""

    def maybe() -> bool:
        return bool(rng.integers(2))

    if maybe():
        image = (image + rng.uniform(-32, 32)).clamp(0, 255)
    contrast_first = maybe()
    if contrast_first and maybe():
        image = (image * rng.uniform(0.5, 1.5)).clamp(0, 255)
    if maybe():
        image = TF.adjust_saturation(image / 255, rng.uniform(0.5, 1.5)).clamp(0, 1) * 255
    if maybe():  # mmcv: +-18 on OpenCV's 0..180 hue scale = +-0.1 of the hue circle
        image = TF.adjust_hue(image / 255, rng.uniform(-18, 18) / 180).clamp(0, 1) * 255
    if not contrast_first and maybe():
        image = (image * rng.uniform(0.5, 1.5)).clamp(0, 255)
    return image


def normalize(image: torch.Tensor) -> torch.Tensor:
    return (image - MEAN) / STD


class SegmentationDataset(Dataset):
    """Image/label pairs. Training keys are ``(index, seed)`` so augmentation replays exactly on resume."""

    def __init__(
        self,
        pairs: list[SegPair],
        num_classes: int,
        aug: SegAugConfig,
        *,
        train: bool,
        reduce_zero_label: bool,
    ) -> None:
        if not pairs:
            raise ValueError("segmentation dataset has no image/label pairs")
        self.pairs, self.num_classes, self.aug, self.train = pairs, num_classes, aug, train
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        image, label = load_pair(self.pairs[index], self.num_classes, self.reduce_zero_label)
        if not self.train:
            # Eval: keep-ratio resize to the bound; the label stays at full resolution for the metric.
            size = rescale_size(*image.shape[-2:], self.aug.scale)
            resized, _ = resize_pair(image, None, size)
            return {"image": normalize(resized), "label": label, "index": torch.tensor(index)}
        rng = np.random.default_rng([seed, index])
        # 1. Random rescale: bound x ratio.
        ratio = rng.uniform(*self.aug.ratio_range)
        bound = (self.aug.scale[0] * ratio, self.aug.scale[1] * ratio)
        image, label = resize_pair(image, label, rescale_size(*image.shape[-2:], bound))
        # 2. Random crop with class balance, 3. flip, 4. photometric distortion.
        image, label = random_crop(image, label, self.aug.crop_size, self.aug.cat_max_ratio, rng)
        if rng.uniform() < self.aug.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        if self.aug.photometric:
            image = photometric_distortion(image, rng)
        # 5. Normalise and pad to the crop size (image 0, label ignore).
        image = normalize(image)
        pad_h, pad_w = self.aug.crop_size - image.shape[1], self.aug.crop_size - image.shape[2]
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE)
        return {"image": image, "label": label, "index": torch.tensor(index)}
