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

import logging
from pathlib import Path
from typing import Any

import torch

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
        from teachers.provenance import Provenance

        provenance = Provenance.from_dict(bank.spec.attributes)
        source = "online" if fresh else "replay"
        if not fresh and (bank.spec.mean_of > 1 or bank.spec.mirror):
            what = (
                f"means of {bank.spec.mean_of} draws" if bank.spec.mean_of > 1 else "mirrored flipped views"
            )
            raise ValueError(
                f"distill.targets=replay re-computes a bank's stored draws, and {bank.path} holds {what}; "
                "use distill.targets=bank (its rows) or online (fresh draws)"
            )
        self.encoder = provenance.rebuild_encoder(
            teachers, device, levels=levels, purpose=f"distill.targets={source}"
        )
        self.teacher = self.encoder.teacher
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
        from teachers.encoding import fresh_seed

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


class BankLabels:
    """The bank's soft labels (``dreamteacher interpret``), dequantised on the device after the host->device copy
    (each view's own: a mirrored bank stores its flipped views' labels, computed from the mirrored features)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, batch: dict[str, Any], feats: dict[str, torch.Tensor]) -> torch.Tensor:
        from bank import decode_labels

        return decode_labels(batch["labels"], self.device)


class InterpreterLabels:
    """The interpreter run on the batch's teacher features (online / replay targets: fresh features, fresh
    labels), in eval mode and without gradients, as ``dreamteacher interpret`` writes them into a bank."""

    def __init__(self, path: str | Path, device: torch.device, *, sha256: str = "") -> None:
        from teachers.interpreter import file_sha256, load_interpreter

        self.model, _ = load_interpreter(path, device, sha256=sha256)
        self.levels = self.model.levels
        self.sha256 = sha256 or file_sha256(path)
        """The interpreter's identity (a distill run records it)."""

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model({name: feats[name] for name in self.levels}).float()
