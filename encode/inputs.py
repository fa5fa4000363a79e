"""What ``run_encode`` is given: its config sections with every derived value resolved (``dreamteacher.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass

from bank.config import BankConfig
from encode.config import EncodeConfig
from sources.datasets import DatasetConfig
from teachers.config import TeacherConfig


@dataclass(frozen=True, kw_only=True)
class EncodeInputs:
    """``encode`` has ``teacher``, ``t`` and ``bank`` filled in; ``dataset`` / ``teacher`` are the named entries.

    ``encode.resolution`` may still be 0 (the teacher's native size): only the loaded teacher knows it, so
    ``run_encode`` records the measured value in the bank's provenance and its ``config.yaml``.
    """

    encode: EncodeConfig
    bank: BankConfig
    dataset: DatasetConfig
    teacher: TeacherConfig
