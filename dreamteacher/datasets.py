"""Named datasets (the ``datasets:`` section of pipeline.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
