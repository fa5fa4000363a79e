"""Distillation losses against values computed by hand / with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.losses import attention_map, attention_transfer, feature_losses, label_distillation, whiten


def test_whiten_sample_matches_numpy() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) ** 1.5
    ref = x.numpy()
    mu = ref.reshape(2, -1).mean(1)[:, None, None, None]
    var = ref.reshape(2, -1).var(1)[:, None, None, None]
    np.testing.assert_allclose(
        whiten(x, "sample").numpy(), (ref - mu) / np.sqrt(var + 1e-6), rtol=1e-5, atol=1e-5
    )


def test_whiten_pixel_normalises_each_pixel_over_channels() -> None:
    x = torch.tensor([[[[1.0]], [[3.0]]]])  # (1, 2, 1, 1): channel values 1 and 3 -> mean 2, std 1
    np.testing.assert_allclose(whiten(x, "pixel").flatten().numpy(), [-1.0, 1.0], atol=1e-5)


def test_attention_transfer_by_hand() -> None:
    # one sample, 1 channel, 2 pixels: student A = [1, 0] -> Q = [1, 0]; teacher A = [1, 1] -> Q = [1, 1]/sqrt 2
    pred = torch.tensor([[[[1.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0]]]])
    np.testing.assert_allclose(
        attention_map(target).numpy(), [[1 / math.sqrt(2), 1 / math.sqrt(2)]], rtol=1e-6
    )
    expected = math.sqrt((1 - 1 / math.sqrt(2)) ** 2 + (1 / math.sqrt(2)) ** 2)
    assert attention_transfer(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_attention_sums_channels_and_normalises_per_sample() -> None:
    # sample 0: channels (1, 2) at pixel 0 and (0, 0) at pixel 1 -> Q = [5, 0] -> [1, 0]
    # sample 1 is sample 0 scaled by 10: a per-sample normalisation gives the same map (a batch one would not)
    s0 = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]]])
    pred = torch.stack([s0, 10 * s0])
    np.testing.assert_allclose(attention_map(pred).numpy(), [[1.0, 0.0], [1.0, 0.0]], atol=1e-7)
    target = torch.stack([s0.flip(-1), s0.flip(-1)])  # Q = [0, 1]: distance sqrt 2 for both samples
    assert attention_transfer(pred, target).item() == pytest.approx(math.sqrt(2), rel=1e-6)


def test_feature_losses_terms_and_total() -> None:
    torch.manual_seed(0)
    target = {"s4": torch.randn(2, 3, 4, 4), "s8": torch.randn(2, 5, 2, 2)}
    preds = {"s4": whiten(target["s4"], "sample"), "s8": torch.zeros(2, 5, 2, 2) + 0.5}
    terms = feature_losses(preds, target, whiten_axes="sample", at_weight=10.0)
    assert terms["mse/s4"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["at/s4"].item() == pytest.approx(0.0, abs=1e-6)
    white = whiten(target["s8"], "sample").numpy()
    mse_s8 = float(((0.5 - white) ** 2).mean())
    assert terms["mse/s8"].item() == pytest.approx(mse_s8, rel=1e-5)
    q_pred = np.full((2, 4), 0.5)  # constant prediction -> uniform attention map
    q_t = (white**2).sum(1).reshape(2, 4)
    at_s8 = np.linalg.norm(
        q_pred / np.linalg.norm(q_pred, axis=1, keepdims=True)
        - q_t / np.linalg.norm(q_t, axis=1, keepdims=True),
        axis=1,
    ).mean()
    assert terms["at/s8"].item() == pytest.approx(at_s8, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(mse_s8 / 2 + 10.0 * at_s8 / 2, rel=1e-5)


def test_feature_losses_refuse_mismatched_levels() -> None:
    with pytest.raises(ValueError, match="prediction levels"):
        feature_losses(
            {"s4": torch.zeros(1, 1, 1, 1)},
            {"s8": torch.zeros(1, 1, 1, 1)},
            whiten_axes="sample",
            at_weight=1.0,
        )


def test_label_distillation_by_hand() -> None:
    # 2 classes, one pixel: teacher logits (0, ln 3) at tau 1 -> p = (1/4, 3/4); student logits 0 -> log q = ln 1/2
    teacher = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])
    student = torch.zeros(1, 2, 1, 1)
    assert label_distillation(student, teacher, 1.0).item() == pytest.approx(math.log(2.0), rel=1e-6)
    # tau = 2 softens the teacher: p = softmax(0, ln3 / 2) = (1, sqrt 3) / (1 + sqrt 3); the student stays uniform
    assert label_distillation(student, teacher, 2.0).item() == pytest.approx(math.log(2.0), rel=1e-6)
    student = torch.tensor([[[[math.log(3.0)]], [[0.0]]]])  # q = (3/4, 1/4)
    expected = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert label_distillation(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
