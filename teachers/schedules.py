"""Noise schedules (float64), as guided-diffusion computes them for its ``noise_schedule`` flag."""

from __future__ import annotations

import math

import torch


def linear_betas(num_steps: int) -> torch.Tensor:
    """Ho et al.'s linear schedule, 1e-4 .. 0.02 at 1000 steps, rescaled to ``num_steps`` (guided-diffusion)."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make_alphas_cumprod(schedule: str, num_steps: int) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s), float64, length ``num_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_steps}")
    return torch.cumprod(1.0 - SCHEDULES[schedule](num_steps), dim=0)
