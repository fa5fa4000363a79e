"""Flags of the released guided-diffusion checkpoints (from openai/guided-diffusion's README), by preset name.

A config names a preset and may override single flags: ``teacher: {kind: adm, preset: adm-256-uncond,
checkpoint: ${ADM_CKPT}, flags: {dropout: 0.0}}``. No torch import: configs are validated before models load.
"""

from __future__ import annotations

from typing import Any

_ADM_256_COMMON: dict[str, Any] = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "channel_mult": "",
    "attention_resolutions": "32,16,8",
    "num_head_channels": 64,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "learn_sigma": True,
    "use_fp16": True,
    "noise_schedule": "linear",
    "diffusion_steps": 1000,
}

ADM_PRESETS: dict[str, dict[str, Any]] = {
    # 256x256_diffusion_uncond.pt: the paper's ImageNet teacher.
    "adm-256-uncond": {**_ADM_256_COMMON, "class_cond": False},
    # 256x256_diffusion.pt: class-conditional ImageNet (needs teacher.class_label).
    "adm-256-cond": {**_ADM_256_COMMON, "class_cond": True},
    # lsun_bedroom.pt / lsun_cat.pt / lsun_horse.pt (and lsun_horse_nodropout.pt): same network, dropout 0.1.
    "adm-256-lsun": {**_ADM_256_COMMON, "class_cond": False, "dropout": 0.1},
    # 64x64_diffusion.pt: class-conditional ImageNet 64, cosine schedule, new attention order.
    "adm-64-cond": {
        "image_size": 64,
        "num_channels": 192,
        "num_res_blocks": 3,
        "channel_mult": "",
        "attention_resolutions": "32,16,8",
        "num_head_channels": 64,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "use_new_attention_order": True,
        "learn_sigma": True,
        "class_cond": True,
        "dropout": 0.1,
        "use_fp16": True,
        "noise_schedule": "cosine",
        "diffusion_steps": 1000,
    },
    # 128x128_diffusion.pt: class-conditional ImageNet 128, 4 heads.
    "adm-128-cond": {
        "image_size": 128,
        "num_channels": 256,
        "num_res_blocks": 2,
        "channel_mult": "",
        "attention_resolutions": "32,16,8",
        "num_heads": 4,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "learn_sigma": True,
        "class_cond": True,
        "use_fp16": True,
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
    },
}


def preset_flags(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's flags with ``overrides`` applied; "" = no preset (the overrides must then be complete)."""
    if preset and preset not in ADM_PRESETS:
        raise ValueError(f"unknown ADM preset {preset!r}; valid presets: {', '.join(ADM_PRESETS)}")
    return {**(ADM_PRESETS[preset] if preset else {}), **(overrides or {})}
