"""Where a batch's teacher targets come from: the bank (dequantised on the device) or the teacher itself (online).

Both return ``{level: (B, C, h, w) float32 on the device}`` for the same rows, so the training step cannot tell
them apart; ``--online`` exists to measure what the cache costs (time here, quality downstream).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


class BankTargets:
    """Decode the bank payload of a batch after the host->device copy (int8 travels, float32 arrives)."""

    def __init__(self, device: torch.device, levels: list[str]) -> None:
        self.device, self.levels = device, levels

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from bank import decode_targets

        payload = {name: batch["targets"][name] for name in self.levels}
        return decode_targets(payload, self.device)


class OnlineTargets:
    """Recompute the bank's targets with its teacher from the stored input pixels and the same noise rule.

    The read-out (mode, T, DDIM steps, taps, resolution) is the bank's recorded ``teachers.provenance.Provenance``,
    rebuilt by the same ``build_encoder`` encode uses; the teacher entry of the recorded name in this config gives
    only the weights' location, and the weights must be the recorded ones (sha256). A row's noise comes from its
    stored seed and flip (``teachers.encoding.make_noise``), so the targets equal the stored ones up to the bank
    codec's error.
    """

    def __init__(
        self, bank_attrs: dict[str, Any], teachers: dict[str, Any], levels: list[str], device: torch.device
    ) -> None:
        from teachers.provenance import Provenance, build_encoder

        provenance = Provenance.from_dict(bank_attrs)
        name = provenance.teacher_name
        if name not in teachers:
            raise ValueError(
                f"--online: the bank was encoded by teacher {name!r}, which is not in the config's "
                f"teachers ({', '.join(sorted(teachers))}); add it with its path / checkpoint"
            )
        teacher_cfg = provenance.teacher_config_at(teachers[name])
        self.encoder = build_encoder(
            teacher_cfg, provenance.encoding, device, taps=provenance.tap_configs(levels), name=name
        )
        self.teacher = self.encoder.teacher
        provenance.check_weights(self.teacher.identity())
        self.device, self.levels, self.mode = device, levels, provenance.encoding.mode

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from teachers.encoding import make_noise

        # 1. the stored preprocessed pixels (flipped rows already flipped) -> [-1, 1]
        x0_BCHW = batch["image"].to(self.device, non_blocking=True).float() / 127.5 - 1.0
        # 2. the row's noise: same seed and mirror rule as encode
        eps_BCHW = None
        if self.mode == "noise":
            seeds = [int(s) for s in batch["seed"]]
            flips = [bool(f) for f in batch["flip"]]
            eps_BCHW = make_noise(seeds, flips, x0_BCHW.shape[1:]).to(self.device)
        # 3. one teacher read-out; clone leaves inference mode so autograd may use the targets
        feats = self.encoder(x0_BCHW, eps_BCHW)
        return {name: feats[name].float().clone() for name in self.levels}


class LabelLogits:
    """Interpreter logits per bank row from a safetensors file (``logits``: (rows, K, h, w)), read per batch."""

    def __init__(self, path: str | Path, num_rows: int) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"distill.loss.label_logits: {str(path)!r} does not exist")
        self._file = safe_open(str(path), framework="pt")
        if "logits" not in self._file.keys():  # noqa: SIM118 - safe_open is not a mapping
            raise ValueError(f"{path} has no 'logits' tensor (found {list(self._file.keys())})")
        self._slice = self._file.get_slice("logits")
        shape = self._slice.get_shape()
        if len(shape) != 4 or shape[0] != num_rows:
            raise ValueError(f"{path}: logits shape {shape}; expected (bank rows = {num_rows}, K, h, w)")
        self.num_classes = int(shape[1])

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``(B, K, h, w)`` logits of the batch's rows (contiguous per-row slices: no full-file load)."""
        return torch.cat([self._slice[int(r) : int(r) + 1] for r in rows]).float()
