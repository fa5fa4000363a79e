"""Teacher diagnostics on hand-built 'teachers' whose flip and noise behaviour is known exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from teachers.diagnostics import cosine_per_level, flip_and_noise_diagnostics

SYMMETRIC = torch.tensor([1.0, 2.0, 1.0])  # mirror-symmetric along W: conv commutes with the flip
ANTISYMMETRIC = torch.tensor([1.0, 0.0, -1.0])  # a horizontal gradient: conv(mirror x) = -mirror(conv x)


def conv_teacher(kernel_W: torch.Tensor, noise_scale: float):  # noqa: ANN201 - an encode callable
    weight = kernel_W.view(1, 1, 1, 3).repeat(3, 1, 1, 1)  # depthwise, one 1x3 kernel per channel

    def encode(x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        x_t = x0_BCHW + noise_scale * eps_BCHW
        return {"s1": F.conv2d(x_t, weight, padding=(0, 1), groups=3)}

    return encode


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_noise_free_symmetric_teacher_is_exactly_equivariant_and_deterministic(images: torch.Tensor) -> None:
    r = flip_and_noise_diagnostics(conv_teacher(SYMMETRIC, 0.0), images, [1, 2, 3, 4])["s1"]
    assert r == pytest.approx(
        {"draw_to_draw": 1.0, "flip_same_noise": 1.0, "flip_fresh_noise": 1.0}, abs=1e-6
    )


def test_antisymmetric_kernel_flips_the_sign(images: torch.Tensor) -> None:
    r = flip_and_noise_diagnostics(conv_teacher(ANTISYMMETRIC, 0.0), images, [1, 2, 3, 4])["s1"]
    assert r["draw_to_draw"] == pytest.approx(1.0, abs=1e-6)
    assert r["flip_same_noise"] == pytest.approx(-1.0, abs=1e-6)


def test_pure_noise_teacher_draws_are_uncorrelated_but_same_noise_flips_match() -> None:
    zeros = torch.zeros(8, 3, 32, 32)
    r = flip_and_noise_diagnostics(conv_teacher(SYMMETRIC, 1.0), zeros, list(range(8)))["s1"]
    # two independent draws: cosine ~ N(0, 1/sqrt(n)) with n = 3*32*32 per image, averaged over 8 images
    assert abs(r["draw_to_draw"]) < 0.05 and abs(r["flip_fresh_noise"]) < 0.05
    assert r["flip_same_noise"] == pytest.approx(1.0, abs=1e-6)  # mirrored noise: the network's gap only


def test_cosine_per_level_by_hand() -> None:
    a = {"s4": torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]]])}  # two samples, (1, 1, 2) each
    b = {"s4": torch.tensor([[[[0.0, 2.0]]], [[[2.0, 2.0]]]])}
    assert cosine_per_level(a, b) == {"s4": pytest.approx((0.0 + 1.0) / 2)}
    with pytest.raises(ValueError, match="levels differ"):
        cosine_per_level(a, {"s8": b["s4"]})
