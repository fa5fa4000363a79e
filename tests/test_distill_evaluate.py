"""Held-out fidelity: the metric by hand on tiny cases, and its noise floor on a teacher of known variance."""

from __future__ import annotations

import math

import pytest
import torch

from distill.evaluate import expected_features, fidelity_terms, noise_floor, score


def test_fidelity_terms_by_hand() -> None:
    # one sample, one channel, 1x2 map: target [0, 2] whitens (per sample) to [-1, 1] (eps aside)
    target = {"s4": torch.tensor([[[[0.0, 2.0]]]])}
    pred = {"s4": torch.tensor([[[[-1.0, 3.0]]]])}
    r = fidelity_terms(pred, target, "sample")["s4"]
    assert r["mse"] == pytest.approx((0.0**2 + 2.0**2) / 2, rel=1e-5)
    assert r["cos"] == pytest.approx((1 + 3) / (math.sqrt(10) * math.sqrt(2)), rel=1e-5)
    # attention maps: pred |.|^2 = [1, 9] / sqrt(82), target [1, 1] / sqrt(2)
    q_p = torch.tensor([1.0, 9.0]) / math.sqrt(82)
    q_t = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    assert r["at"] == pytest.approx(float((q_p - q_t).norm()), rel=1e-5)


def test_a_perfect_prediction_of_the_expected_feature_scores_zero_error() -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 4, 3, 3)

    def encode(x0: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"s8": base + 0.3 * eps[:, :1, :3, :3].repeat(1, 4, 1, 1)}

    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    seeds = [[10, 11, 12, 13], [20, 21, 22, 23]]
    mean, _ = expected_features(encode, images.float(), seeds)
    from distill.losses import whiten

    report = score(lambda _u8: {"s8": whiten(mean["s8"], "sample")}, encode, [(images, seeds)], "sample")
    assert report.student["s8"]["mse"] == pytest.approx(0.0, abs=1e-10)
    assert report.student["s8"]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert report.student["s8"]["at"] == pytest.approx(0.0, abs=1e-6)
    assert report.images == 2 and report.draws == 4


def test_noise_floor_of_a_noisy_teacher_matches_its_variance() -> None:
    # feature = a constant map c plus sigma * noise: whitened single draws differ from the whitened mean, and
    # the floor grows with sigma; a noise-free teacher's floor is exactly zero
    c = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)

    def teacher(sigma: float):  # noqa: ANN202
        return lambda x0, eps: {"s4": c + sigma * eps[:, :1]}

    x0 = torch.zeros(1, 3, 8, 8)
    seeds = [list(range(16))]
    floors = []
    for sigma in (0.0, 0.1, 0.5):
        mean, singles = expected_features(teacher(sigma), x0, seeds)
        floors.append(noise_floor(mean, singles, "sample")["s4"])
    assert floors[0]["mse"] == pytest.approx(0.0, abs=1e-10) and floors[0]["cos"] == pytest.approx(1.0)
    assert floors[0]["mse"] < floors[1]["mse"] < floors[2]["mse"]
    assert floors[0]["cos"] > floors[1]["cos"] > floors[2]["cos"]
