"""Finetune stage config (no torch import). One small dataclass per component.

Defaults are the paper-scale protocols (paper.md, "Downstream protocols": ADE20K UperNet 160k iterations, the
label-efficient benchmarks UperNet 20k iterations, COCO Mask R-CNN 1x); the demo and the tests shrink them through the
config (crop 64, min/max size 64, a few hundred steps), never through code branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

SEGMENTATION_PROTOCOL_ITERS: dict[str, int] = {"ade20k": 160_000, "fewshot": 20_000}
"""Default ``segmentation.iters`` per task, from the paper's appendix (paper.md, "Downstream protocols"): ADE20K is
UperNet (MMSegmentation defaults) for 160k iterations; the label-efficient benchmarks (bedroom-28, FFHQ-34, cat-15,
horse-21: 20-40 labelled images) are UperNet for 20k iterations (at batch 16, 8000 passes over 40 images)."""

PROTOCOL_BATCH: dict[str, int] = {"ade20k": 16, "coco": 16, "fewshot": 16, "imagenet": 2048, "linear": 16384}
"""Default global ``batch_size`` per task: mmseg / detectron2 16; RSB A2 2048; MAE's linear probe 16384."""

Norm = Literal["sync", "batch", "frozen"]
"""Backbone batch-norm handling: ``sync`` = SyncBatchNorm across ranks (plain BatchNorm on one process),
``batch`` = per-rank BatchNorm, ``frozen`` = FrozenBatchNorm2d (statistics and affine fixed)."""


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then poly or step decay)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    """SGD only."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW only."""
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    """Learning rate at step 0 as a fraction of ``lr`` (linear ramp to ``lr`` over ``warmup_iters``)."""
    schedule: Literal["poly", "step"] = "poly"
    poly_power: float = 1.0
    min_lr: float = 0.0
    """Poly schedule floor."""
    milestones: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])
    """Step schedule: decay points as fractions of the run (detectron2 1x: epochs 8 and 11 of 12)."""
    gamma: float = 0.1
    """Step schedule: factor applied at each milestone."""
    grad_clip: float = 0.0
    """Max gradient norm (0 = off)."""


@dataclass(kw_only=True)
class UperNetConfig:
    """UperNet decode head (PPM on the stride-32 level + FPN fusion) and the auxiliary FCN head."""

    channels: int = 512
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1
    aux_weight: float = 0.4
    """Loss weight of the auxiliary FCN head on the stride-16 level; 0 = no auxiliary head."""
    aux_channels: int = 256


@dataclass(kw_only=True)
class SegAugConfig:
    """mmsegmentation's ADE20K training pipeline."""

    scale: tuple[int, int] = (2048, 512)
    """(long, short) edge bound of the base resize, multiplied by a random ratio in training."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    """Re-draw a crop (up to 10 times) when one class covers more than this fraction of its labelled pixels."""
    flip_prob: float = 0.5
    photometric: bool = True


@dataclass(kw_only=True)
class SegEvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    """whole: one forward on the resized image; slide: overlapping ``crop_size`` windows at ``stride``."""
    crop_size: int = 512
    stride: int = 341


@dataclass(kw_only=True)
class SegmentationConfig:
    """Semantic segmentation (tasks ``ade20k`` and ``fewshot``)."""

    num_classes: int = 0
    """0 = from the data (ADE20K: 150; fewshot: lines of ``classes.txt``)."""
    iters: int = 0
    """Training steps; 0 = the task's protocol (:data:`SEGMENTATION_PROTOCOL_ITERS`: ade20k 160k, fewshot 20k),
    filled in when the :class:`FinetuneConfig` is built, so the saved config shows the number used."""
    norm: Norm = "sync"
    head: UperNetConfig = field(default_factory=UperNetConfig)
    aug: SegAugConfig = field(default_factory=SegAugConfig)
    eval: SegEvalConfig = field(default_factory=SegEvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(kw_only=True)
class DetectionConfig:
    """COCO instance segmentation with torchvision's Mask R-CNN on backbone + FPN."""

    schedule: Literal["1x", "2x"] = "1x"
    """1x = 12 epochs (decay at 8, 11), 2x = 24 epochs (decay at 16, 22)."""
    iters: int = 0
    """Override the schedule's length in steps (0 = epochs x training images / batch size)."""
    train_min_sizes: list[int] = field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    """Shorter side drawn per image in training; evaluation uses the last one (torchvision's rule)."""
    max_size: int = 1333
    norm: Norm = "sync"
    fpn_channels: int = 256
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    """One anchor size per FPN level (P2..P6)."""
    flip_prob: float = 0.5
    filter_empty_train: bool = True
    """Drop training images without (non-crowd) instances, as detectron2 does; evaluation keeps every image."""
    detections_per_img: int = 100
    rpn_post_nms_top_n_train: int = 2000
    """Proposals kept per image after the RPN's NMS in training (torchvision / detectron2: 2000)."""
    rpn_post_nms_top_n_test: int = 1000
    """The same at evaluation (torchvision / detectron2: 1000)."""
    box_batch_size_per_image: int = 512
    """RoIs sampled per image for the box and mask heads' loss (torchvision / detectron2: 512). Small images with
    a few objects need far fewer; the head's cost grows with it."""
    box_head_dim: int = 1024
    """Hidden size of the box head's two FC layers (torchvision / detectron2: 1024)."""
    mask_head_channels: int = 256
    """Channels of the mask head's four 3x3 convs (256 standard; small values for 64x64 demo runs)."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="sgd", lr=0.02, weight_decay=1e-4, warmup_iters=1000, warmup_ratio=1e-3, schedule="step"
        )
    )


@dataclass(kw_only=True)
class ClassifyOptimConfig:
    """Optimizer (timm ``create_optimizer_v2``) and cosine schedule (timm ``create_scheduler_v2``, per update)."""

    name: str = "lamb"
    """Any ``create_optimizer_v2`` name: lamb (RSB), lars (MAE linear probe), sgd, adamw, ..."""
    lr: float = 5e-3
    lr_base_size: int = 0
    """0: ``lr`` is the lr at any batch; N: the lr is ``lr x batch_size / N`` (MAE: base lr 0.1 at 256)."""
    weight_decay: float = 0.02
    momentum: float = 0.9
    """SGD / LARS momentum."""
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    grad_clip: float = 0.0


@dataclass(kw_only=True)
class ClassificationConfig:
    """Image classification on an ``imagefolder`` dataset: fine-tuning (``imagenet``, defaults = timm's "ResNet
    strikes back" A2) and the linear probe (``linear``, :func:`linear_probe_protocol`: MAE's). docs/finetune.md."""

    num_classes: int = 0
    """0 = the class folders of the train split."""
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 300
    img_size: int = 224
    """Train and test resolution."""
    crop_pct: float = 0.95
    """Test: resize to img_size / crop_pct, center crop img_size."""
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    hflip: float = 0.5
    auto_augment: str = "rand-m7-mstd0.5-inc1"
    """timm RandAugment string; empty = none."""
    mixup: float = 0.1
    cutmix: float = 1.0
    """Mixup / CutMix alphas (timm ``Mixup``, one of the two per batch; 0 and 0 = off)."""
    smoothing: float = 0.0
    loss: Literal["bce", "ce"] = "bce"
    """bce: timm ``BinaryCrossEntropy``; ce: ``SoftTargetCrossEntropy`` with mixup, else label-smoothing CE."""
    bce_target_thresh: float = 0.2
    """BCE targets binarised at this threshold (timm ``--bce-target-thresh``; 0 = off)."""
    repeats: int = 3
    """Repeated augmentation: each image this many times per epoch, differently augmented (1 = off)."""
    drop_path: float = 0.05
    """Stochastic depth of the fine-tuned model (not used by the linear probe)."""
    ema_decay: float = 0.0
    """Model EMA (timm ``ModelEmaV3``) decay, evaluated in place of the model; 0 = off (RSB A2: no EMA)."""
    optim: ClassifyOptimConfig = field(default_factory=ClassifyOptimConfig)


def linear_probe_protocol() -> ClassificationConfig:
    """MAE's linear probe (He et al. 2022, appendix A.2): LARS, base lr 0.1 (x batch / 256), wd 0, momentum 0.9,
    batch 16384, 90 epochs with 10 warm-up, RandomResizedCrop + flip only, test resize 256 + center crop 224."""
    return ClassificationConfig(
        epochs=90,
        crop_pct=0.875,
        auto_augment="",
        mixup=0.0,
        cutmix=0.0,
        loss="ce",
        bce_target_thresh=0.0,
        repeats=1,
        drop_path=0.0,
        optim=ClassifyOptimConfig(
            name="lars",
            lr=0.1,
            lr_base_size=256,
            weight_decay=0.0,
            warmup_epochs=10,
            min_lr=0.0,
            warmup_lr=0.0,
        ),
    )


@dataclass(kw_only=True)
class FinetuneConfig:
    """``dreamteacher finetune``: one downstream run."""

    task: Literal["ade20k", "coco", "fewshot", "imagenet", "linear"] = "ade20k"
    data: str = ""
    """Name in ``datasets:`` (its layout must match the task); empty = the task's dataset (``dreamteacher.resolve``:
    ade20k, coco, bedroom-28 for fewshot, imagenet for imagenet and linear)."""
    backbone: str = "resnet50"
    """timm model name of the backbone (strides 4/8/16/32: resnet18/50/101, convnext_atto/base, ...)."""
    ckpt: str = ""
    """Backbone weights (``backbone.safetensors`` from distill, timm parameter names); empty = random init."""
    exp: str = "default"
    out: str = "runs/finetune"
    """The run goes to ``<out>/<exp>/``."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    batch_size: int = 0
    """Global batch size = per-device batch x devices x ``accum_steps``; 0 = the task's protocol
    (:data:`PROTOCOL_BATCH`), filled in when the config is built."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches per optimizer step (``training/accumulate.py``)."""
    num_workers: int = 4
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """channels_last memory format on CUDA (ignored on CPU)."""
    log_every: int = 50
    checkpoint_every: int = 2000
    eval_every: int = 0
    """Evaluate every N steps during training (0 = only at the end)."""
    vis_samples: int = 4
    """Validation images drawn in ``predictions.png``."""
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    classify: ClassificationConfig = field(default_factory=ClassificationConfig)
    """``task: imagenet``: full fine-tuning (RSB A2)."""
    linear: ClassificationConfig = field(default_factory=linear_probe_protocol)
    """``task: linear``: frozen backbone, BatchNorm (no affine) + linear head (MAE protocol)."""

    def __post_init__(self) -> None:
        problems = []
        if self.segmentation.iters < 0:
            problems.append(
                f"finetune.segmentation.iters must be >= 0 (0 = the task's protocol), got {self.segmentation.iters}"
            )
        elif self.segmentation.iters == 0 and self.task in SEGMENTATION_PROTOCOL_ITERS:
            # A copy, not an edit: a SegmentationConfig passed in may be shared with another task's config.
            self.segmentation = replace(self.segmentation, iters=SEGMENTATION_PROTOCOL_ITERS[self.task])
        if self.batch_size == 0:
            self.batch_size = PROTOCOL_BATCH[self.task]
        if self.batch_size < 1:
            problems.append(
                f"finetune.batch_size must be >= 1 (0 = the task's protocol), got {self.batch_size}"
            )
        if self.accum_steps < 1:
            problems.append(f"finetune.accum_steps must be >= 1, got {self.accum_steps}")
        if self.segmentation.aug.crop_size < 32:
            problems.append("finetune.segmentation.aug.crop_size must be >= 32 (the backbone's stride)")
        if sorted(self.detection.optim.milestones) != list(self.detection.optim.milestones):
            problems.append("finetune.detection.optim.milestones must be increasing fractions of the run")
        if problems:
            raise ValueError("; ".join(problems))
