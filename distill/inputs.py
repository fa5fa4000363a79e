"""What ``run_distill`` is given: its config section with every derived value resolved (``dreamteacher.resolve``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.config import DistillConfig
from teachers.config import TeacherConfig


@dataclass(frozen=True, kw_only=True)
class DistillInputs:
    """``distill.bank`` is filled in (default ``banks/<encode.data>.zarr``)."""

    distill: DistillConfig
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """The config's teacher entries: online targets find the bank's recorded teacher weights here."""
