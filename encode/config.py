"""Encode stage config (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class EncodeConfig:
    """``dreamteacher encode``: which data, which teacher, how to encode, where the bank goes."""

    data: str = "demo"
    """Name in ``datasets:``."""
    teacher: str = ""
    """Name in ``teachers:``; empty = the dataset's ``teacher``."""
    bank: str = ""
    """Output bank path; empty = ``banks/<data>.zarr``."""
    mode: Literal["noise", "ddim"] = "noise"
    """noise: the paper's stochastic encoding (one UNet pass at T); ddim: deterministic DDIM inversion to T."""
    t: int = 0
    """Noise step T; 0 = the dataset's ``t`` (150 ImageNet, 50 LSUN/FFHQ/BDD in the paper)."""
    ddim_steps: int = 10
    """DDIM inversion steps from 0 to T (mode=ddim)."""
    draws: int = 2
    """Stochastic draws stored per image (each a bank row)."""
    flips: Literal["none", "both"] = "both"
    """both: also store the mirrored image's features (the paper's only augmentation)."""
    seed: int = 0
    """Global seed; a row's noise seed is derived from (seed, image key, draw)."""
    resolution: int = 0
    """Input size; 0 = the teacher's native resolution."""
    batch_size: int = 32
    num_workers: int = 4
    """DataLoader workers decoding images."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
