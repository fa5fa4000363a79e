"""Where a batch's teacher targets come from: ``distill.targets`` = bank | online | replay.

* ``bank``: the stored rows, dequantised on the device after the host->device copy.
* ``online``: the paper's procedure. The teacher encodes the row's stored input pixels with **fresh** noise on
  every visit: the seed is a function of (global seed, image key, visit, flip), where a visit is
  ``epoch * draws + draw``, so two runs see the same noise, a resumed run continues it exactly, and no visit repeats
  a stored draw. The flipped view is the encoding of the mirrored pixels (the row's stored pixels are mirrored
  already).
* ``replay``: the teacher re-computes the bank's own targets from the stored seeds (equal to the bank's rows up to
  its codec's error). It measures what the cache saves in time, nothing about quality: ``make bench-distill``.

All return ``{level: (B, C, h, w) float32 on the device}`` for the same rows, so the training step cannot tell
them apart.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


class BankTargets:
    """Decode the bank payload of a batch after the host->device copy (int8 travels, float32 arrives); the
    flipped views of a mirrored bank (``batch["mirror"]``) are mirrored there too, and a projected level's
    coefficients go back to its C channels there (one matmul), before the loss whitens them."""

    def __init__(
        self, device: torch.device, levels: list[str], projections: dict[str, Any] | None = None
    ) -> None:
        """``projections``: the bank's bases (``Bank.projections``), moved to the device once, here."""
        self.device, self.levels = device, levels
        self.projections = {name: p.to(device) for name, p in (projections or {}).items() if name in levels}

    def set_epoch(self, epoch: int) -> None:
        """Stored rows do not depend on the visit."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from bank import decode_targets

        payload = {name: batch["targets"][name] for name in self.levels}
        return decode_targets(payload, self.device, mirror=batch.get("mirror"), projections=self.projections)


def fresh_seed(global_seed: int, key: str, visit: int, flip: int) -> int:
    """A 63-bit noise seed of one visit of one view, from sha256("fresh/seed/visit/flip/key").

    The ``fresh/`` prefix keeps these seeds apart from the bank's stored draws (``teachers.encoding.row_seed``).
    """
    digest = hashlib.sha256(f"fresh/{int(global_seed)}/{int(visit)}/{int(flip)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class TeacherTargets:
    """Targets computed by the bank's teacher from the stored input pixels: fresh noise (``online``) or the
    stored noise (``replay``).

    The read-out (mode, T, DDIM steps, taps, resolution) is the bank's recorded ``teachers.provenance.Provenance``,
    rebuilt by the same ``build_encoder`` encode uses; the teacher entry of the recorded name in this config gives
    only the weights' location, and the weights must be the recorded ones (sha256).
    """

    def __init__(
        self,
        bank: Any,
        teachers: dict[str, Any],
        levels: list[str],
        device: torch.device,
        *,
        fresh: bool,
        seed: int = 0,
    ) -> None:
        from teachers.provenance import Provenance, build_encoder

        provenance = Provenance.from_dict(bank.spec.attributes)
        name = provenance.teacher_name
        source = "online" if fresh else "replay"
        if not fresh and (bank.spec.mean_of > 1 or bank.spec.mirror):
            what = (
                f"means of {bank.spec.mean_of} draws" if bank.spec.mean_of > 1 else "mirrored flipped views"
            )
            raise ValueError(
                f"distill.targets=replay re-computes a bank's stored draws, and {bank.path} holds {what}; "
                "use distill.targets=bank (its rows) or online (fresh draws)"
            )
        if name not in teachers:
            raise ValueError(
                f"distill.targets={source}: the bank was encoded by teacher {name!r}, which is not in the config's "
                f"teachers ({', '.join(sorted(teachers))}); add it with its path / checkpoint"
            )
        teacher_cfg = provenance.teacher_config_at(teachers[name])
        self.encoder = build_encoder(
            teacher_cfg, provenance.encoding, device, taps=provenance.tap_configs(levels), name=name
        )
        self.teacher = self.encoder.teacher
        provenance.check_weights(self.teacher.identity())
        self.device, self.levels, self.mode = device, levels, provenance.encoding.mode
        self.fresh, self.seed, self.draws = fresh, seed, bank.spec.draws
        self._bank = bank
        self.epoch = 0
        """Set by the training loop at every epoch start (``set_epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def noise_seeds(self, batch: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """Per row: the noise seed and whether ``make_noise`` mirrors it."""
        flips = [bool(f) for f in batch["flip"]]
        if not self.fresh:  # the stored draw: same seed and mirror rule as encode
            return [int(s) for s in batch["seed"]], flips
        # the batch's keys only: a whole-bank key list would hold millions of strings at ImageNet scale
        keys = self._bank.keys([int(row) for row in batch["row"]])
        seeds = [
            fresh_seed(self.seed, key, self.epoch * self.draws + int(draw), int(flip))
            for key, draw, flip in zip(keys, batch["draw"], batch["flip"], strict=True)
        ]
        return seeds, [False] * len(seeds)  # a fresh draw per view: nothing to mirror

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from teachers.encoding import make_noise

        # 1. the stored preprocessed pixels (flipped rows already flipped) -> [-1, 1]
        x0_BCHW = batch["image"].to(self.device, non_blocking=True).float() / 127.5 - 1.0
        # 2. the row's noise: fresh per visit (online) or the stored draw (replay)
        eps_BCHW = None
        if self.mode == "noise":
            seeds, mirrored = self.noise_seeds(batch)
            eps_BCHW = make_noise(seeds, mirrored, self.encoder.noise_shape).to(
                self.device
            )  # image or latent
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
