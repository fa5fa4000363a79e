"""Build a frozen teacher from its config: a registry of model families keyed by ``TeacherConfig.kind``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from configlib import require_resolved
from teachers.base import Teacher
from teachers.config import TapConfig, TeacherConfig


def _load_diffusers(cfg: TeacherConfig) -> Teacher:
    from teachers.diffusers_unet import DiffusersTeacher

    if not cfg.path:
        raise ValueError("teacher.path is empty: set it to a diffusers save_pretrained folder or a hub id")
    return DiffusersTeacher.from_pretrained(require_resolved(cfg.path, "teacher.path"))


def _load_adm(cfg: TeacherConfig) -> Teacher:
    from teachers.adm import ADMTeacher
    from teachers.adm_presets import preset_flags

    if not cfg.checkpoint:
        raise ValueError(
            "teacher.checkpoint is empty: set it to a guided-diffusion .pt file "
            "(e.g. checkpoint: ${ADM_CKPT} with ADM_CKPT=/path/to/256x256_diffusion_uncond.pt)"
        )
    if not cfg.preset and not cfg.flags:
        raise ValueError(
            "an adm teacher needs teacher.preset (e.g. adm-256-uncond) or the full teacher.flags"
        )
    return ADMTeacher.from_checkpoint(
        require_resolved(cfg.checkpoint, "teacher.checkpoint"),
        preset_flags(cfg.preset, cfg.flags),
        class_label=cfg.class_label,
        preset=cfg.preset,
    )


TEACHER_KINDS: dict[str, Callable[[TeacherConfig], Teacher]] = {
    "diffusers": _load_diffusers,
    "adm": _load_adm,
}
"""kind -> loader returning the teacher on CPU in float32. A new family adds one entry (docs/teachers.md)."""


def build_teacher(cfg: TeacherConfig, device: torch.device | str) -> Teacher:
    """Load the teacher, freeze it (eval, no grads) and move it to ``device`` (channels_last on CUDA if set)."""
    if cfg.kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind {cfg.kind!r}; valid kinds: {', '.join(TEACHER_KINDS)}")
    teacher = TEACHER_KINDS[cfg.kind](cfg)
    return freeze(teacher, torch.device(device), channels_last=cfg.channels_last)


def freeze(teacher: Teacher, device: torch.device, *, channels_last: bool) -> Teacher:
    """eval mode, ``requires_grad=False``, on ``device``; channels_last memory format on CUDA when asked."""
    teacher.eval().requires_grad_(False)
    teacher.to(device)
    if channels_last and device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    return teacher


def resolve_taps(teacher: Teacher, cfg: TeacherConfig) -> list[TapConfig]:
    """The configured taps, or the teacher family's defaults (the paper's four levels) when none are set."""
    return list(cfg.taps) if cfg.taps else teacher.default_taps()
