"""One distillation step, kept apart from construction (train.py) so it can be tested with real tiny objects."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import WhitenAxes, feature_losses, label_distillation
from training.accumulate import accumulate_backward
from training.deferred import DeferredTerms
from training.runtime import Runtime

log = logging.getLogger(__name__)

TargetFn = Callable[[dict], dict[str, torch.Tensor]]
"""batch -> ``{level: (B, C, h, w) float32 on the device}`` (read from the bank, or computed online)."""
LabelFn = Callable[[dict, dict[str, torch.Tensor]], torch.Tensor]
"""(batch, its targets) -> the interpreter's soft-label logits ``(B, K, h, w)`` float32 on the device."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names the step and every term."""


@dataclass(kw_only=True)
class StepSettings:
    whiten: WhitenAxes
    at_weight: float
    label_weight: float = 0.0
    label_temperature: float = 4.0
    grad_clip: float = 0.0
    accum_steps: int = 1
    """Micro-batches per optimizer step (``training.accumulate``): the loader's batch is split into this many."""


class Trainer:
    """Holds the objects one step needs; :meth:`train_step` runs forward, loss, backward and the update."""

    def __init__(
        self,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: object,
        targets: TargetFn,
        settings: StepSettings,
        runtime: Runtime,
        *,
        scaler: torch.amp.GradScaler | None = None,
        step: int = 0,
        labels: LabelFn | None = None,
    ) -> None:
        """``model`` is what runs forward (DDP / compiled wrapper); ``net`` the plain :class:`DistillNet`.
        ``labels``: mix distillation's soft labels (the net then has a label head), None = feature only.

        ``runtime`` gives the device, the autocast (bf16/fp16 on CUDA, float32 on CPU) and channels_last.
        """
        self.model, self.net, self.optimizer, self.scheduler = model, net, optimizer, scheduler
        self.targets, self.settings, self.runtime, self.labels = targets, settings, runtime, labels
        self.device = runtime.device
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.step = step
        self.terms = DeferredTerms(NonFiniteLossError)
        """Each step's loss terms, on the device until :meth:`flush` (no host sync inside a step)."""
        self._resized_logged: set[str] = set()

    def _match_size(self, preds: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict:
        """Resize a teacher level to the student's size at that stride (bilinear) and say so once."""
        matched = {}
        for name, pred in preds.items():
            target = targets[name]
            if target.shape[-2:] != pred.shape[-2:]:
                if name not in self._resized_logged:
                    log.warning(
                        "level %s: teacher feature %s resized to the student's %s (bilinear)",
                        name,
                        tuple(target.shape[-2:]),
                        tuple(pred.shape[-2:]),
                    )
                    self._resized_logged.add(name)
                target = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
            matched[name] = target
        return matched

    def flush(self) -> list[dict[str, float]]:
        """The loss terms (and ``grad_norm``, ``lr``) of every step since the last flush, as floats; raises
        :class:`NonFiniteLossError` for the first step with a non-finite term. Call before logging or saving."""
        return self.terms.flush()

    def _losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward and every loss term (float32) of one (micro-)batch."""
        s = self.settings
        # 1. inputs: uint8 pixels -> normalised float on the device
        images_BCHW = self.net.normalize(batch["image"].to(self.device, non_blocking=True))
        if self.runtime.channels_last:
            images_BCHW = images_BCHW.contiguous(memory_format=torch.channels_last)
        # 2. targets from the bank (dequantised on the device) or from the teacher
        targets = self.targets(batch)
        # 3. forward
        with self.runtime.autocast():
            out = self.model(images_BCHW)
        logits = out.pop("logits", None)
        # 4. losses in float32
        terms = feature_losses(
            out, self._match_size(out, targets), whiten_axes=s.whiten, at_weight=s.at_weight
        )
        # 5. mix distillation: L_mix = L_feat + lambda * L_ld, the student's logits at the soft labels' grid
        if self.labels is not None:
            if logits is None:
                raise ValueError(
                    "mix distillation needs the label head: build DistillNet with num_classes > 0"
                )
            interp_BKhw = self.labels(batch, targets)
            logits = F.interpolate(
                logits.float(), size=interp_BKhw.shape[-2:], mode="bilinear", align_corners=False
            )
            terms["feat"] = terms["loss"]
            terms["label"] = label_distillation(logits, interp_BKhw, s.label_temperature)
            terms["loss"] = terms["feat"] + s.label_weight * terms["label"]
        return terms

    def train_step(self, batch: dict) -> None:
        """One optimisation step on ``batch`` (the bank loader's dict, split into ``accum_steps`` micro-batches,
        DDP syncing gradients on the last only); its terms (means over the batch) are queued for :meth:`flush`."""
        s = self.settings
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = accumulate_backward(
            self.model,
            batch,
            s.accum_steps,
            self._losses,
            backward=lambda loss: self.scaler.scale(loss).backward(),
        )
        # 6. clip, update, schedule. No host sync: the terms stay on the device until flush() (the finite check
        #    runs there, at most log_every steps late and always before a checkpoint).
        values: dict[str, torch.Tensor | float] = dict(terms)
        self.scaler.unscale_(self.optimizer)
        if s.grad_clip > 0:
            values["grad_norm"] = nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        self.terms.add(self.step, values, unchecked=("grad_norm",))
        self.step += 1
        self.scheduler.step_update(self.step)
