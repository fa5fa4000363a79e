"""The whole ``pipeline.yaml``: one typed section per stage, each owned by its package."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bank.config import BankConfig
from configlib import ConfigError, apply_overrides, from_mapping, read_yaml
from distill.config import DistillConfig
from encode.config import EncodeConfig
from finetune.config import FinetuneConfig
from sources.datasets import DatasetConfig
from teacher_training.config import TeacherTrainConfig
from teachers.config import TeacherConfig

DEFAULT_CONFIG = "pipeline.yaml"


@dataclass(kw_only=True)
class DemoSizeConfig:
    """One size of the demo: each stage's settings as ``KEY.PATH=VALUE`` overrides of this pipeline config.

    Overrides (the command line's syntax) keep the recipe next to the stage configs they change, and every one is
    validated by the same loader before the demo starts. The orchestration adds only what ties the stages
    together (bank path, experiment folders, backbone checkpoint, task, seed).
    """

    encode: list[str] = field(default_factory=list)
    """Applied for the encode stage (and everything after it), e.g. ``datasets.demo.limit=1000``."""
    distill: list[str] = field(default_factory=list)
    fewshot: list[str] = field(default_factory=list)
    """Fine-tuning on the few-label semantic split (``demo-fewshot``)."""
    coco: list[str] = field(default_factory=list)
    """Fine-tuning Mask R-CNN on ``demo-coco``."""
    num_seeds: int = 0
    """Use the first N of ``demo.seeds`` (0 = all)."""


_DEMO_FINETUNE = ["finetune.backbone=resnet18", "finetune.num_workers=0", "finetune.batch_size=8",
                  "finetune.checkpoint_every=100000", "finetune.vis_samples=4"]  # fmt: skip
_DEMO_FEWSHOT = [
    *_DEMO_FINETUNE, "finetune.segmentation.norm=batch", "finetune.segmentation.head.channels=64",
    "finetune.segmentation.head.aux_channels=32", "finetune.segmentation.aug.scale=[64,64]",
    "finetune.segmentation.aug.crop_size=64", "finetune.segmentation.eval.mode=whole",
    "finetune.segmentation.eval.crop_size=64", "finetune.segmentation.optim.lr=0.001",
    "finetune.segmentation.optim.warmup_iters=20", "finetune.log_every=10",
]  # fmt: skip
_DEMO_COCO = [
    *_DEMO_FINETUNE, "finetune.detection.norm=batch", "finetune.detection.train_min_sizes=[64]",
    "finetune.detection.max_size=64", "finetune.detection.fpn_channels=64",
    "finetune.detection.anchor_sizes=[8,16,32,64,128]", "finetune.detection.box_head_dim=128",
    "finetune.detection.mask_head_channels=32", "finetune.detection.detections_per_img=20",
    # RoI budgets for 64x64 scenes with <= 4 objects (torchvision's defaults are for 800 px COCO): 3.4x faster steps
    "finetune.detection.rpn_post_nms_top_n_train=200", "finetune.detection.rpn_post_nms_top_n_test=200",
    "finetune.detection.box_batch_size_per_image=64",
    "finetune.detection.optim.warmup_iters=20", "finetune.log_every=10",
]  # fmt: skip
_DEMO_DISTILL = ["distill.student.name=resnet18", "distill.regressor.channels=128", "distill.num_workers=0",
                 "distill.batch_size=32", "distill.optim.lr=0.002", "distill.optim.warmup_epochs=1",
                 "distill.log_every=10", "distill.checkpoint_every=100000"]  # fmt: skip


def _demo_sizes() -> dict[str, DemoSizeConfig]:
    return {
        "full": DemoSizeConfig(
            encode=[
                "datasets.demo.limit=1000",
                "encode.draws=1",
                "encode.flips=both",
                "encode.batch_size=32",
                "encode.num_workers=0",
            ],  # fmt: skip
            distill=[*_DEMO_DISTILL, "distill.max_steps=300"],
            fewshot=[*_DEMO_FEWSHOT, "finetune.segmentation.iters=150"],
            coco=[*_DEMO_COCO, "finetune.detection.iters=100"],
        ),
        "debug": DemoSizeConfig(
            encode=[
                "datasets.demo.limit=16",
                "encode.draws=1",
                "encode.flips=none",
                "encode.batch_size=16",
                "encode.num_workers=0",
            ],  # fmt: skip
            # debug: the smallest ResNet in timm with strides 4-32 (4.9M parameters) keeps the test short
            distill=[
                *_DEMO_DISTILL,
                "distill.student.name=resnet10t",
                "distill.batch_size=8",
                "distill.max_steps=2",
                "distill.log_every=1",
            ],
            fewshot=[
                *_DEMO_FEWSHOT,
                "finetune.backbone=resnet10t",
                "finetune.segmentation.iters=2",
                "finetune.segmentation.optim.warmup_iters=1",
            ],
            coco=[
                *_DEMO_COCO,
                "finetune.backbone=resnet10t",
                "finetune.detection.iters=2",
                "finetune.detection.optim.warmup_iters=1",
                "finetune.detection.filter_empty_train=false",
            ],  # fmt: skip
            num_seeds=1,
        ),
    }


@dataclass(kw_only=True)
class DemoConfig:
    """``make demo``: the whole pipeline on generated data."""

    out: str = "runs/demo"
    """Run folder: bank, distill and finetune runs, ``report.md`` with its PNGs, ``results.json``."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Fine-tuning seeds; the report gives mean and spread over them."""
    size: str = "full"
    """Key of ``sizes``: full (the README's figures) or debug (seconds, used by the test)."""
    teacher: str = "demo"
    """Name in ``teachers:`` that encodes the demo images (the shipped ``assets/demo-teacher``)."""
    use_dask: bool = False
    """Encode through a local dask cluster (as real runs do); off by default: on one CPU it only adds start-up."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default for encode and distill, cores / parallel_runs for each
    fine-tuning run). 1 is faster on a CPU shared with other jobs: two processes with two spinning threads each on
    two cores slow each other down several-fold."""
    parallel_runs: int = 0
    """Fine-tuning runs at once, each in its own process (0 = one per CPU core on CPU, one at a time on CUDA)."""
    sizes: dict[str, DemoSizeConfig] = field(default_factory=_demo_sizes)


@dataclass(kw_only=True)
class PipelineConfig:
    datasets: dict[str, DatasetConfig]
    teachers: dict[str, TeacherConfig]
    encode: EncodeConfig
    bank: BankConfig
    distill: DistillConfig
    finetune: FinetuneConfig
    teacher_train: TeacherTrainConfig
    demo: DemoConfig = field(default_factory=DemoConfig)

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(
                f"unknown dataset {name!r}; datasets in the config: {', '.join(sorted(self.datasets))}"
            )
        return self.datasets[name]

    def teacher(self, name: str) -> TeacherConfig:
        if name not in self.teachers:
            raise ConfigError(
                f"unknown teacher {name!r}; teachers in the config: {', '.join(sorted(self.teachers))}"
            )
        return self.teachers[name]


def load_pipeline(
    path: str | Path = DEFAULT_CONFIG, overrides: tuple[str, ...] | list[str] = ()
) -> PipelineConfig:
    """Read ``pipeline.yaml``, apply ``key.path=value`` overrides, validate into :class:`PipelineConfig`."""
    data: dict[str, Any] = apply_overrides(read_yaml(path), overrides)
    return from_mapping(PipelineConfig, data)
