"""Distill stage config (no torch import). One small dataclass per component."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bank.config import ChunkCheck


@dataclass(kw_only=True)
class StudentConfig:
    name: str = "resnet50"
    """Any timm model with ``features_only`` strides 4/8/16/32 (resnet18/50/101, convnext_atto/base, ...)."""
    weights: str = ""
    """Optional local weights file (safetensors) to start from; empty = random init (it is pretraining)."""


@dataclass(kw_only=True)
class RegressorConfig:
    channels: int = 256
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])


@dataclass(kw_only=True)
class LossConfig:
    whiten: Literal["sample", "pixel"] = "sample"
    """Non-learnable LayerNorm on the teacher feature: over (C,H,W) per sample, or over C per pixel. Default
    sample: per-pixel whitening flattens the per-pixel energy that attention transfer distils (distill/losses.py)."""
    at_weight: float = 10.0
    """L_feat = MSE + at_weight * AT (paper: 10)."""
    mix: bool = False
    """Mix distillation (the paper's L_mix = L_feat + label_weight * L_ld): the student's logit head also learns
    the feature interpreter's soft labels: the bank's (``dreamteacher interpret`` writes them) for
    ``targets=bank``, the interpreter run on the teacher's fresh features for ``targets=online`` / ``replay``."""
    label_weight: float = 1.0
    """lambda of L_mix (paper: 1.0)."""
    label_temperature: float = 4.0
    """Softmax temperature tau of L_ld (paper: 4.0); no tau^2 factor (distill/losses.py says why)."""
    interpreter: str = ""
    """Interpreter file for online / replay mix distillation; empty = ``dreamteacher interpret``'s output
    (``<interpret.out>/<interpret.exp>/interpreter.safetensors``). Checked against the sha256 the bank's soft
    labels record, when it holds any."""


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = 4e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 20
    epochs: float = 100
    grad_clip: float = 3.0
    """Max gradient norm (0 = off)."""
    min_lr: float = 1.0e-6
    """Cosine floor."""
    warmup_lr: float = 1.0e-6
    """Learning rate at step 0 of the linear warm-up."""


@dataclass(kw_only=True)
class DistillConfig:
    """``dreamteacher distill``: one experiment on one bank."""

    recipe: str = ""
    """Shipped recipe ``configs/distill/<name>.yaml`` applied over this section (before command-line overrides):
    empty = the one named after the bank's dataset (``encode.data``) if it exists (``imagenet``: the paper's
    ImageNet recipe), ``none`` = no recipe. Filled in with the recipe applied (``none`` if none)."""
    bank: str = ""
    """Bank path; empty = ``banks/<encode.data>.zarr``."""
    exp: str = "default"
    out: str = "runs/distill"
    """Experiments go to ``<out>/<exp>/``."""
    levels: list[str] = field(default_factory=list)
    """Bank levels to distill (e.g. ``[s8, s16, s32]``); empty = every level of the bank."""
    student: StudentConfig = field(default_factory=StudentConfig)
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 256
    """Global batch size = per-device batch x devices x ``accum_steps`` (the recipe's batch)."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches per optimizer step (``training/accumulate.py``), so a global batch of
    2048 runs on fewer devices. Steps, epochs and the lr schedule count optimizer steps."""
    max_steps: int = 0
    """Stop after this many steps (0 = epochs x steps per epoch)."""
    stop_at_step: int = 0
    """End this invocation after this step with a checkpoint (resume later with --resume), keeping the full run's
    schedule: for time-sliced / preemptible jobs. 0 = run to the end."""
    num_workers: int = 4
    verify_chunks: ChunkCheck = "first"
    """When the loader checks a bank chunk's crc32c (``bank.config.ChunkCheck``): ``first`` the first time each
    worker reads the chunk (a corrupt chunk stops the run before it is trained on; later epochs skip the second
    pass over the bytes), ``always`` on every read, ``never``."""
    draw: Literal["random", "first"] = "random"
    """Which of an image's K stored draws an epoch uses."""
    targets: Literal["bank", "online", "replay"] = "bank"
    """Where the teacher targets come from (``distill/targets.py``): ``bank`` the stored rows; ``online`` the
    paper's procedure, the bank's teacher encoding the stored pixels with fresh noise on every visit; ``replay``
    the teacher re-computing the stored draws (a speed measurement: same targets as the bank)."""
    flip: Literal["random", "none"] = "random"
    """Which flip view an epoch uses per image when the bank stores both (the paper's h-flip augmentation)."""
    compile: bool = False
    """``torch.compile`` the student + regressor."""
    amp: bool = True
    """Autocast on CUDA (CPU always runs float32)."""
    amp_dtype: Literal["bf16", "fp16"] = "bf16"
    """bf16 needs no loss scaler; fp16 uses a GradScaler (saved in checkpoints)."""
    channels_last: bool = True
    """channels_last memory format on CUDA."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    log_every: int = 10
    """Steps between metric records (metrics.jsonl, TensorBoard)."""
    audit_rows: bool = False
    """Append the bank rows each rank trains on to ``<exp>/rows/rank<r>.txt`` (coverage audit, e.g. of DDP)."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda, cuda:N."""

    def __post_init__(self) -> None:
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
