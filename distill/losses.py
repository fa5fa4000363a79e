"""Distillation losses (stateless): whitened MSE, attention transfer, label distillation.

L_feat = L_MSE + at_weight * L_AT, each the mean over levels (the paper's 1/L sum_l).

* Whitening W: a LayerNorm without learnable parameters on the TEACHER feature. ``"sample"`` normalises each
  sample over (C, H, W); ``"pixel"`` normalises each pixel over C. Default ``"sample"``: per-pixel whitening makes
  sum_c W(f)_c^2 = C at every pixel, i.e. it erases exactly the spatial energy pattern attention transfer
  transfers (the AT target map becomes constant), so the two loss terms would pull apart.
* L_MSE: mean over all elements of (prediction - W(teacher))^2 (the paper's squared norm, divided by the element
  count so the value does not scale with resolution or channels).
* L_AT: the PAPER's form with p = 2: Q = vec(sum_c |A_c|^2) per sample, Q / ||Q||_2 per sample, loss = ||Q_s - Q_t||_2
  per sample, averaged over the batch. The target of AT is W(teacher) (the thing the prediction regresses), so MSE
  and AT share their optimum. szagoruyko/attention-transfer instead uses the channel MEAN of A^2, normalises,
  and takes the MEAN of the SQUARED difference over pixels (and batch): same normalised maps (the mean and the sum
  differ by 1/C, removed by the normalisation), but a squared, per-pixel-averaged distance, which is smaller by a
  factor ~H*W/||d|| and has a different gradient profile.
* Label distillation L_ld: cross-entropy between the temperature-softened interpreter distribution and the
  student's (-sum_k softmax(t/tau)_k log_softmax(s/tau)_k, mean over pixels and batch), as in the paper, and
  L_mix = L_feat + lambda * L_ld (``distill.loss.mix``). No tau^2 factor: Hinton et al. multiply by tau^2 to keep
  the soft term's gradients (which scale as 1/tau) comparable to a HARD-label cross-entropy's when both are
  summed; here nothing hard-labelled is summed with it, the paper writes L_ld without the factor, and its
  lambda = 1.0 was chosen for that form (with tau = 4 the factor would weigh L_ld 16x).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

WhitenAxes = Literal["sample", "pixel"]
WHITEN_EPS = 1e-6


def whiten(feat_BCHW: torch.Tensor, axes: WhitenAxes) -> torch.Tensor:
    """Non-learnable LayerNorm: per sample over (C, H, W) or per pixel over C."""
    if axes == "sample":
        return F.layer_norm(feat_BCHW, feat_BCHW.shape[1:], eps=WHITEN_EPS)
    if axes == "pixel":
        feat_BHWC = feat_BCHW.permute(0, 2, 3, 1)
        return F.layer_norm(feat_BHWC, feat_BHWC.shape[-1:], eps=WHITEN_EPS).permute(0, 3, 1, 2)
    raise ValueError(f"whiten axes {axes!r} is not one of 'sample', 'pixel'")


def attention_map(feat_BCHW: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Q = vec(sum_c |A_c|^p), L2-normalised per sample: ``(B, H*W)``."""
    q_BN = feat_BCHW.abs().pow(p).sum(dim=1).flatten(1)
    return F.normalize(q_BN, p=2, dim=1, eps=1e-12)


def attention_transfer(pred_BCHW: torch.Tensor, target_BCHW: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Mean over the batch of ||Q(pred) - Q(target)||_2 (the paper's form; see the module docstring)."""
    diff_BN = attention_map(pred_BCHW, p) - attention_map(target_BCHW, p)
    return diff_BN.norm(p=2, dim=1).mean()


def feature_losses(
    preds: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    whiten_axes: WhitenAxes,
    at_weight: float,
) -> dict[str, torch.Tensor]:
    """Per-level and total terms: ``mse/<level>``, ``at/<level>``, ``mse``, ``at``, ``loss`` (= mse + w*at).

    ``preds`` and ``targets`` must have the same levels and shapes (resize before calling). Computed in float32.
    """
    if set(preds) != set(targets):
        raise ValueError(f"prediction levels {sorted(preds)} != target levels {sorted(targets)}")
    terms: dict[str, torch.Tensor] = {}
    for name in sorted(preds):
        pred, target = preds[name].float(), targets[name].float()
        if pred.shape != target.shape:
            raise ValueError(f"level {name}: prediction {tuple(pred.shape)} vs target {tuple(target.shape)}")
        white = whiten(target, whiten_axes)
        terms[f"mse/{name}"] = F.mse_loss(pred, white)
        terms[f"at/{name}"] = attention_transfer(pred, white)
    levels = sorted(preds)
    terms["mse"] = torch.stack([terms[f"mse/{n}"] for n in levels]).mean()
    terms["at"] = torch.stack([terms[f"at/{n}"] for n in levels]).mean()
    terms["loss"] = terms["mse"] + at_weight * terms["at"]
    return terms


def label_distillation(
    student_logits_BKHW: torch.Tensor, teacher_logits_BKHW: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft cross-entropy between temperature-softened teacher (interpreter) and student class distributions."""
    if student_logits_BKHW.shape != teacher_logits_BKHW.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_BKHW.shape)} vs interpreter logits "
            f"{tuple(teacher_logits_BKHW.shape)}"
        )
    soft_target = F.softmax(teacher_logits_BKHW.float() / temperature, dim=1)
    log_student = F.log_softmax(student_logits_BKHW.float() / temperature, dim=1)
    return -(soft_target * log_student).sum(dim=1).mean()
