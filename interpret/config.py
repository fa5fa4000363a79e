"""Interpret stage config (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class InterpretConfig:
    """``dreamteacher interpret``: the paper's feature interpreter (``teachers/interpreter.py``), trained on a
    few labelled images with the bank's teacher and read-out, then run over every bank row (soft labels)."""

    data: str = "bedroom-28"
    """Few-label dataset entry (layout ``fewshot``: ``<root>/{train,test}/`` images + class maps)."""
    bank: str = ""
    """The bank whose teacher encodes the labelled images and which receives the soft labels; empty =
    ``banks/<encode.data>.zarr`` (as distill)."""
    out: str = "runs/interpret"
    exp: str = ""
    """Run folder ``<out>/<exp>/``; empty = the dataset name. Holds ``interpreter.safetensors`` (re-used by a
    re-run: pass ``--retrain`` to train again), ``metrics.jsonl``, ``results.json``, ``config.yaml``."""
    num_classes: int = 0
    """0 = the dataset's ``classes.txt``."""
    channels: int = 256
    dropout: float = 0.1
    epochs: int = 100
    batch_size: int = 8
    lr: float = 4.0e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    dice_weight: float = 3.0
    """loss = CE + dice_weight * Dice (the paper: 3.0)."""
    flip: bool = True
    """Random horizontal flip per image and epoch (the teacher encodes the mirrored pixels)."""
    stride: int = 4
    """Soft-label grid: bank image size / stride (the paper's finest level: 4)."""
    codec: str = "fp16"
    """How the soft labels are stored: fp16 or any bank codec (int8, int4, fp8, ...)."""
    checkpoint_every: int = 10
    """Epochs between training checkpoints (a killed run resumes from the last one)."""
    seed: int = 0
    """Interpreter init, data order, flips and the teacher's fresh noise draws."""
    device: str = "auto"
    levels: list[str] = field(default_factory=list)
    """Bank levels the interpreter reads; empty = every level of the bank."""
