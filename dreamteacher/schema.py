"""The whole ``pipeline.yaml``: one typed section per stage, each owned by its package."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bank.config import BankConfig
from distill.config import DistillConfig
from dreamteacher.config import ConfigError, apply_overrides, from_mapping, read_yaml
from dreamteacher.datasets import DatasetConfig
from encode.config import EncodeConfig
from finetune.config import FinetuneConfig
from teachers.config import TeacherConfig, TeacherTrainConfig

DEFAULT_CONFIG = "pipeline.yaml"


@dataclass(kw_only=True)
class DemoConfig:
    """``make demo``: the whole pipeline on generated data."""

    out: str = "runs/demo"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Fine-tuning seeds; the report gives mean and spread over them."""
    size: str = "full"
    """full (the README's figures) or debug (seconds, used by the test)."""


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
            raise ConfigError(f"unknown dataset {name!r}; datasets in the config: {', '.join(sorted(self.datasets))}")
        return self.datasets[name]

    def teacher(self, name: str) -> TeacherConfig:
        if name not in self.teachers:
            raise ConfigError(f"unknown teacher {name!r}; teachers in the config: {', '.join(sorted(self.teachers))}")
        return self.teachers[name]


def load_pipeline(path: str | Path = DEFAULT_CONFIG, overrides: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """Read ``pipeline.yaml``, apply ``key.path=value`` overrides, validate into :class:`PipelineConfig`."""
    data: dict[str, Any] = apply_overrides(read_yaml(path), overrides)
    return from_mapping(PipelineConfig, data)
