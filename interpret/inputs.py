"""What ``run_interpret`` is given: its config section with every derived value resolved (``dreamteacher.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from interpret.config import InterpretConfig
from sources.datasets import DatasetConfig
from teachers.config import TeacherConfig


@dataclass(frozen=True, kw_only=True)
class InterpretInputs:
    """``interpret.bank`` and ``interpret.exp`` are filled in; ``dataset`` is the few-label entry."""

    interpret: InterpretConfig
    dataset: DatasetConfig
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """The config's teacher entries: the bank's recorded teacher weights are found here."""
