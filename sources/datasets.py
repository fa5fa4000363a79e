"""Named datasets (the ``datasets:`` section of pipeline.yaml)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from configlib import ConfigError, require_resolved

Layout = Literal["imagefolder", "folder", "list", "wds", "ade20k", "coco", "fewshot"]


@dataclass(kw_only=True)
class DatasetConfig:
    """Where a dataset lives and how it is laid out on disk."""

    root: str
    """Folder (or list file / shard pattern for ``list`` / ``wds``). ``${VAR}`` is expanded."""
    layout: Layout
    """imagefolder: ``<split>/<class>/*.JPEG``; folder: any images below root (recursive); list: a text file of
    paths; wds: WebDataset tar shards (brace pattern); ade20k / coco / fewshot: the finetune layouts."""
    split: str = "train"
    """Sub-folder / split name where the layout has splits."""
    teacher: str = ""
    """Name in ``teachers:`` that encodes this dataset by default (the paper's per-dataset choice)."""
    t: int = 0
    """Noise step T the paper uses for this dataset (0 = use ``encode.t``)."""
    generator: str = ""
    """Built-in generator that writes this dataset on first use when ``root`` is missing (``demo-scenes``)."""
    limit: int = 0
    """Use only the first N images in the deterministic order (0 = all); handy for smoke runs."""


def _demo_scenes(root: Path, layout: str, progress: bool) -> None:
    from sources.demo_scenes import generate  # numpy / PIL / pycocotools: only when data is generated

    generate(root, layout, progress=progress)


# Built-in generators: name -> function(root, layout, progress) writing the dataset in that layout, deterministically.
GENERATORS: dict[str, Callable[[Path, str, bool], None]] = {"demo-scenes": _demo_scenes}


def ensure_available(name: str, dataset: DatasetConfig, *, progress: bool = True) -> Path:
    """Resolve the dataset's root (env vars), generating built-in data on first use (``progress``: its bars);
    clear error if absent."""
    root = Path(require_resolved(dataset.root, f"datasets.{name}.root"))
    if not root.exists() and dataset.generator:
        if dataset.generator not in GENERATORS:
            raise ConfigError(
                f"datasets.{name}.generator: unknown generator {dataset.generator!r}; "
                f"choices: {', '.join(sorted(GENERATORS))}"
            )
        GENERATORS[dataset.generator](root, dataset.layout, progress)
    if not root.exists():
        raise ConfigError(
            f"dataset {name!r}: {root} does not exist. Set datasets.{name}.root in pipeline.yaml (or the "
            f"environment variable it names) to where the {dataset.layout} data lives."
        )
    return root
