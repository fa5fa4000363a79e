"""The whole ``pipeline.yaml``: one typed section per stage, each owned by its package."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bank.config import BankConfig
from configlib import ConfigError, apply_overrides, from_mapping, read_yaml
from distill.config import DistillConfig
from encode.config import EncodeConfig
from finetune.config import FinetuneConfig
from interpret.config import InterpretConfig
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
    interpret: list[str] = field(default_factory=list)
    """The feature interpreter (trained on ``demo-fewshot``'s train split, soft labels into the demo bank)."""
    mix: list[str] = field(default_factory=list)
    """Applied on top of ``distill`` for the mix-distilled student (``distill.loss.mix=true`` is added)."""
    fewshot: list[str] = field(default_factory=list)
    """Fine-tuning on the few-label semantic split (``demo-fewshot``)."""
    coco: list[str] = field(default_factory=list)
    """Fine-tuning Mask R-CNN on ``demo-coco``."""
    num_seeds: int = 0
    """Use the first N of ``demo.seeds`` (0 = all)."""


RECIPES = Path(__file__).resolve().parents[1] / "configs"
"""Shipped recipe files (``configs/demo/<size>.yaml``); tests/test_recipes.py loads and validates every one."""


def load_demo_sizes(folder: str | Path = RECIPES / "demo") -> dict[str, DemoSizeConfig]:
    """Every ``<size>.yaml`` in ``folder`` as a :class:`DemoSizeConfig` (unknown keys rejected with the file)."""
    sizes = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            sizes[path.stem] = from_mapping(DemoSizeConfig, read_yaml(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    return sizes


@dataclass(kw_only=True)
class DemoConfig:
    """``make demo``: the whole pipeline on generated data."""

    out: str = "runs/demo"
    """Run folder: bank, distill and finetune runs, ``report.md`` with its PNGs, ``results.json``."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Fine-tuning seeds; the report gives mean and spread over them."""
    size: str = "full"
    """Key of ``sizes``: full (the README's figures) or debug (seconds, used by the test): ``configs/demo/<size>.yaml``."""
    teacher: str = "demo"
    """Name in ``teachers:`` that encodes the demo images (the shipped ``assets/demo-teacher``)."""
    use_dask: bool = False
    """Encode through a local dask cluster (as real runs do); off by default: on one CPU it only adds start-up."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default for encode and interpret, cores / parallel_runs for each
    distill and fine-tuning run). 1 is faster on a CPU shared with other jobs: two processes with two spinning threads each on
    two cores slow each other down several-fold."""
    parallel_runs: int = 0
    """Distill and fine-tuning runs at once, each in its own process (0 = one per CPU core on CPU, one at a time
    on CUDA)."""
    sizes: dict[str, DemoSizeConfig] = field(default_factory=load_demo_sizes)
    """Per-size recipes; default: the files in ``configs/demo/`` (one per size)."""


@dataclass(kw_only=True)
class PipelineConfig:
    datasets: dict[str, DatasetConfig]
    teachers: dict[str, TeacherConfig]
    encode: EncodeConfig
    bank: BankConfig
    distill: DistillConfig
    finetune: FinetuneConfig
    interpret: InterpretConfig = field(default_factory=InterpretConfig)
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
    data: dict[str, Any] = apply_recipe(read_yaml(path), overrides)
    return from_mapping(PipelineConfig, apply_overrides(data, overrides))


DISTILL_RECIPES = RECIPES / "distill"


def distill_recipe_name(data: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> str:
    """The distill recipe a config asks for: ``distill.recipe`` if set, else ``encode.data`` when
    ``configs/distill/<encode.data>.yaml`` exists, else ``none``."""
    probe = apply_overrides(copy.deepcopy(data), overrides)
    named = str((probe.get("distill") or {}).get("recipe") or "")
    if named:
        return named
    by_data = str((probe.get("encode") or {}).get("data") or "")
    return by_data if by_data and (DISTILL_RECIPES / f"{by_data}.yaml").is_file() else "none"


def apply_recipe(data: dict[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """Merge the selected ``configs/distill/<name>.yaml`` into ``data['distill']`` (pipeline.yaml < recipe <
    command line); records the name in ``distill.recipe``. The result is validated by the same typed loader, so
    an unknown key in a recipe is rejected like one in pipeline.yaml."""
    name = distill_recipe_name(data, overrides)
    section = data.setdefault("distill", {}) or {}
    data["distill"] = section
    if name != "none":
        path = DISTILL_RECIPES / f"{name}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in DISTILL_RECIPES.glob("*.yaml"))
            raise ConfigError(
                f"distill.recipe={name!r}: no {path}; shipped recipes: {', '.join(shipped)}, or none"
            )
        _merge(section, read_yaml(path))
    section["recipe"] = name
    return data


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
