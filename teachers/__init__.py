"""Diffusion teachers: a model-family-agnostic interface, feature taps and the encoding algorithms.

Model families (diffusers, ADM) are imported only when a teacher is built.
"""

from teachers.base import FeatureTaps, TapInfo, Teacher, discover_taps
from teachers.registry import TEACHER_KINDS, build_teacher, resolve_taps

__all__ = [
    "TEACHER_KINDS",
    "FeatureTaps",
    "TapInfo",
    "Teacher",
    "build_teacher",
    "discover_taps",
    "resolve_taps",
]
