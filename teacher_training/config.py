"""Teacher-training stage config (no torch import here: the CLI loads configs before it needs a model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class TeacherTrainConfig:
    """``dreamteacher teacher``: train an unconditional DDPM (diffusers) on a folder of unlabeled images.

    The defaults are the shipped demo teacher (``assets/demo-teacher``): a 64x64 UNet2DModel with six resolution
    levels (64..2), so its four lowest decoder levels are 2x2, 4x4, 8x8, 16x16 = student strides 32, 16, 8, 4,
    as the paper's 256x256 ADM.
    """

    data: str = "demo"
    """Dataset name in ``datasets:`` (layout ``folder``: any images below its root)."""
    out: str = "runs/teacher/demo"
    """Run folder: checkpoint, metrics.jsonl, samples.png, resolved config and ``pipeline/`` (save_pretrained)."""
    resolution: int = 64
    """Training image size (shorter side resized, then centre crop)."""
    block_out_channels: list[int] = field(default_factory=lambda: [8, 16, 32, 32, 64, 128])
    """Channels per resolution level (one level per entry; each level after the first halves the size)."""
    layers_per_block: int = 1
    attention_levels: list[int] = field(default_factory=lambda: [4, 5])
    """Indices of resolution levels that use self-attention blocks."""
    attention_head_dim: int = 32
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    steps: int = 10000
    """Optimiser steps."""
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    """Linear warm-up, then cosine decay to zero at ``steps``."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    """EMA of the weights; the EMA weights are what ``pipeline/`` ships."""
    seed: int = 0
    checkpoint_every: int = 100
    """Steps between atomic checkpoints (``checkpoint.pt``; resumed with ``--resume``)."""
    log_every: int = 25
    """Steps between metrics.jsonl lines (mean loss since the last line)."""
    sample_count: int = 16
    """Images in the final samples.png grid."""
    sample_steps: int = 50
    """DDIM steps used for the sample grid."""
    num_workers: int = 0
    """DataLoader worker processes (0 = decode in the training process)."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU (0 = torch's default)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N. Single process (no torchrun)."""
    amp: bool = True
    """bf16 autocast on CUDA."""
    channels_last: bool = True
    """channels_last memory format on CUDA."""
    export_dtype: Literal["fp32", "fp16"] = "fp16"
    """Weights dtype of the exported ``pipeline/`` (fp16 halves the shipped size; loaders upcast to float32).
    The training checkpoint always keeps float32."""
