"""Build a frozen teacher from its config: a registry of model families keyed by ``TeacherConfig.kind``.

Messages name the real config key, ``teachers.<name>.<field>`` (the entry under ``teachers:`` in pipeline.yaml);
callers that know the entry's name pass it to :func:`build_teacher`, otherwise the key shows ``<name>``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from configlib import ConfigError, require_resolved
from teachers.base import Teacher
from teachers.config import TapConfig, TeacherConfig

_UNSET_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
"""``${VAR}`` left in a value by the config loader: the variable was not set (``${VAR:-default}`` is expanded)."""


def entry_key(name: str) -> str:
    """The config key of a teacher entry: ``teachers.<name>``."""
    return f"teachers.{name or '<name>'}"


def _load_diffusers(cfg: TeacherConfig, entry: str) -> Teacher:
    from teachers.diffusers_unet import DiffusersTeacher

    key = f"{entry}.path"
    if not cfg.path:
        raise ValueError(f"{key} is empty: set it to a diffusers save_pretrained folder or a hub id")
    return DiffusersTeacher.from_pretrained(require_resolved(cfg.path, key), key=key)


def _load_adm(cfg: TeacherConfig, entry: str) -> Teacher:
    from teachers.adm import ADMTeacher, set_attention
    from teachers.adm_presets import preset_flags

    key = f"{entry}.checkpoint"
    if not cfg.checkpoint:
        raise ValueError(
            f"{key} is empty: set it to a guided-diffusion .pt file "
            "(e.g. checkpoint: ${ADM_CKPT} with `export ADM_CKPT=/path/to/256x256_diffusion_uncond.pt`)"
        )
    unset = _UNSET_VAR.findall(cfg.checkpoint)
    if unset:
        var = unset[0]
        raise ConfigError(
            f"{key} is {cfg.checkpoint!r}, but the environment variable {var} is not set: "
            f"`export {var}=/path/to/<guided-diffusion checkpoint>.pt` "
            f"(e.g. 256x256_diffusion_uncond.pt from openai/guided-diffusion) or pass {key}=/path/to/model.pt"
        )
    if not cfg.preset and not cfg.flags:
        raise ValueError(
            f"an adm teacher needs {entry}.preset (e.g. adm-256-uncond) or the full {entry}.flags"
        )
    teacher = ADMTeacher.from_checkpoint(
        require_resolved(cfg.checkpoint, key),
        preset_flags(cfg.preset, cfg.flags),
        class_label=cfg.class_label,
        preset=cfg.preset,
        key=key,
    )
    set_attention(teacher.unet, cfg.attention)
    return teacher


def _load_gan(cfg: TeacherConfig, entry: str) -> Teacher:
    from teachers.gan import load_gan

    key = f"{entry}.path"
    if not cfg.path:
        raise ValueError(
            f"{key} is empty: set it to a BigGAN checkpoint folder (config.json + pytorch_model.bin, e.g. "
            "biggan-deep-128 from pytorch-pretrained-biggan)"
        )
    if cfg.num_images < 1:
        raise ValueError(f"{entry}.num_images is {cfg.num_images}: set how many images to synthesize (>= 1)")
    return load_gan(require_resolved(cfg.path, key), truncation=cfg.truncation, key=key)


def _load_latent_diffusion(cfg: TeacherConfig, entry: str) -> Teacher:
    from teachers.latent_diffusion import LatentDiffusionTeacher

    key = f"{entry}.path"
    if not cfg.path:
        raise ValueError(f"{key} is empty: set it to a Stable Diffusion save_pretrained folder (e.g. SD 1.5)")
    return LatentDiffusionTeacher.from_pretrained(
        require_resolved(cfg.path, key), vae_input_scale=cfg.vae_input_scale, key=key
    )


TEACHER_KINDS: dict[str, Callable[[TeacherConfig, str], Teacher]] = {
    "diffusers": _load_diffusers,
    "adm": _load_adm,
    "gan": _load_gan,
    "latent-diffusion": _load_latent_diffusion,
}
"""kind -> loader ``(config, entry key "teachers.<name>") -> teacher`` on CPU in float32. A new family adds one
entry (docs/teachers.md); the entry key is for its error messages."""


SYNTHESIZING_KINDS = frozenset({"gan"})
"""Kinds whose banks are synthesized (rows drawn from a seed) instead of encoded from a dataset's images."""


def synthesizes(cfg: TeacherConfig) -> bool:
    """Whether ``dreamteacher encode`` with this teacher synthesizes its bank (no image source)."""
    return cfg.kind in SYNTHESIZING_KINDS


def build_teacher(cfg: TeacherConfig, device: torch.device | str, *, name: str = "") -> Teacher:
    """Load the teacher, freeze it (eval, no grads) and move it to ``device`` (channels_last on CUDA if set).

    ``name`` is the teacher's entry under ``teachers:``; it only makes error messages name the exact key.
    """
    if cfg.kind not in TEACHER_KINDS:
        raise ValueError(
            f"unknown teacher kind {cfg.kind!r} ({entry_key(name)}.kind); valid kinds: {', '.join(TEACHER_KINDS)}"
        )
    teacher = TEACHER_KINDS[cfg.kind](cfg, entry_key(name))
    return freeze(teacher, torch.device(device), channels_last=cfg.channels_last)


def freeze(teacher: Teacher, device: torch.device, *, channels_last: bool) -> Teacher:
    """eval mode, ``requires_grad=False``, on ``device``; channels_last memory format on CUDA when asked."""
    teacher.eval().requires_grad_(False)
    teacher.to(device)
    if channels_last and device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    return teacher


def resolve_taps(teacher: Teacher, cfg: TeacherConfig) -> list[TapConfig]:
    """The configured taps, or the teacher family's defaults (the paper's four levels) when none are set.

    Default taps carry measured strides (``Teacher.default_taps``); configured strides are kept as written and
    checked against the measurement by ``discover_taps``.
    """
    return list(cfg.taps) if cfg.taps else teacher.default_taps()
