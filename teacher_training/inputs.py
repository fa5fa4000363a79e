"""What ``run_teacher_training`` is given (``dreamteacher.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass

from sources.datasets import DatasetConfig
from teacher_training.config import TeacherTrainConfig


@dataclass(frozen=True, kw_only=True)
class TeacherTrainInputs:
    teacher_train: TeacherTrainConfig
    dataset: DatasetConfig
    """The ``datasets:`` entry named by ``teacher_train.data``."""
