"""What ``run_finetune`` is given: its config section with every derived value resolved (``dreamteacher.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import FinetuneConfig
from sources.datasets import DatasetConfig


@dataclass(frozen=True, kw_only=True)
class FinetuneInputs:
    finetune: FinetuneConfig
    dataset: DatasetConfig
    """The ``datasets:`` entry named by ``finetune.data``."""
