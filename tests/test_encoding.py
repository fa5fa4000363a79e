"""Encoding algorithms against hand-computed values, and the TeacherEncoder read-out on a tiny UNet."""

from __future__ import annotations

import math

import pytest
import torch

from teachers.base import FeatureTaps
from teachers.diffusers_unet import DiffusersTeacher
from teachers.encoding import TeacherEncoder, ddim_grid, ddim_invert, make_noise, q_sample, row_seed


def test_q_sample_hand_computed() -> None:
    abar = torch.tensor([0.64, 0.36], dtype=torch.float64)
    x0 = torch.ones(1, 1, 2, 2)
    eps = torch.full((1, 1, 2, 2), 2.0)
    # t=1: sqrt(0.36) * 1 + sqrt(0.64) * 2 = 0.6 + 1.6
    torch.testing.assert_close(q_sample(x0, 1, eps, abar), torch.full((1, 1, 2, 2), 2.2))
    # t=0: 0.8 * 1 + 0.6 * 2
    torch.testing.assert_close(q_sample(x0, 0, eps, abar), torch.full((1, 1, 2, 2), 2.0))


def test_ddim_grid_is_evenly_spaced_and_ends_at_t() -> None:
    assert ddim_grid(10, 3) == [0, 3, 7, 10]
    assert ddim_grid(150, 1) == [0, 150]
    assert ddim_grid(4, 4) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ddim_steps <= t"):
        ddim_grid(3, 5)


def _linear_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in epsilon model with a known closed form: 0.5 x + 0.01 t."""
    return 0.5 * x + 0.01 * t.float()[:, None, None, None]


def test_ddim_invert_matches_hand_written_update() -> None:
    abar = torch.tensor([0.99, 0.81, 0.64], dtype=torch.float64)
    x0 = torch.ones(1, 1, 1, 1)
    got = ddim_invert(_linear_eps, x0, t_end=2, steps=2, alphas_cumprod=abar)
    # Hand reference, grid [0, 1, 2]; state 0 is the clean image (abar = 1):
    # step 1: eps = 0.5 * 1 + 0.01 * 0 = 0.5;  x1 = 0.9 * 1 + sqrt(0.19) * 0.5
    eps1 = 0.5
    x1 = 0.9 + math.sqrt(0.19) * eps1
    # step 2: eps = 0.5 * x1 + 0.01 * 1;  x0_hat = (x1 - sqrt(0.19) eps) / 0.9;  x2 = 0.8 x0_hat + 0.6 eps
    eps2 = 0.5 * x1 + 0.01
    x0_hat = (x1 - math.sqrt(0.19) * eps2) / 0.9
    x2 = 0.8 * x0_hat + 0.6 * eps2
    assert x2 == pytest.approx(1.1146595692856993, abs=1e-12)
    assert float(got) == pytest.approx(x2, rel=1e-6)


def test_ddim_invert_one_step_is_q_sample_with_predicted_noise() -> None:
    abar = torch.linspace(0.99, 0.5, 20, dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = _linear_eps(x0, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(ddim_invert(_linear_eps, x0, 7, 1, abar), q_sample(x0, 7, eps, abar))


def test_ddim_invert_with_exact_eps_recovers_the_forward_trajectory() -> None:
    """If the model returns the true noise of a DDIM trajectory, inversion lands exactly on that trajectory."""
    abar = torch.linspace(0.999, 0.3, 50, dtype=torch.float64)
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps_true = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    # On the deterministic trajectory x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps_true, predicted eps is eps_true.
    got = ddim_invert(lambda x, t: eps_true, x0, t_end=40, steps=5, alphas_cumprod=abar)
    torch.testing.assert_close(got, q_sample(x0, 40, eps_true, abar), rtol=1e-5, atol=1e-5)


def test_row_seed_is_a_stable_63_bit_hash() -> None:
    key = "n01440764/a.JPEG"
    assert row_seed(0, key, 0) == 1606478506332107592  # sha256("0/0/n01440764/a.JPEG")[:8] >> 1
    assert row_seed(0, key, 1) == 3531044296875196377
    assert row_seed(1, key, 0) == 6311946743636490511
    assert len({row_seed(0, f"img{i}", d) for i in range(100) for d in range(3)}) == 300
    assert all(0 <= row_seed(s, key, 0) < 2**63 for s in range(20))


def test_make_noise_rows_independent_of_batch_and_flip_mirrors() -> None:
    seeds = [row_seed(0, "a", 0), row_seed(0, "b", 0)]
    batch = make_noise(seeds, [False, True], (3, 4, 5))
    alone = make_noise(seeds[1:], [False], (3, 4, 5))
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == torch.float32
    reference = torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(seeds[0]))
    torch.testing.assert_close(batch[0], reference, rtol=0, atol=0)
    torch.testing.assert_close(batch[1], alone[0].flip(-1), rtol=0, atol=0)
    # the flipped view's noisy input is exactly the mirror of the unflipped one
    abar = torch.tensor([0.5], dtype=torch.float64)
    x0 = torch.randn(1, 3, 4, 5)
    plain = q_sample(x0, 0, alone, abar)
    flipped = q_sample(x0.flip(-1), 0, make_noise(seeds[1:], [True], (3, 4, 5)), abar)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=0)


@pytest.fixture(scope="module")
def teacher() -> DiffusersTeacher:
    return DiffusersTeacher.debug(32).eval().requires_grad_(False)


def _encoder(teacher: DiffusersTeacher, mode: str, t: int = 50, ddim_steps: int = 3) -> TeacherEncoder:
    return TeacherEncoder(
        teacher,
        teacher.default_taps(),
        mode=mode,  # type: ignore[arg-type]
        t=t,
        ddim_steps=ddim_steps,
        resolution=32,
        device="cpu",
        dtype_name="bf16",
        channels_last=True,
    )


def test_encoder_refuses_a_configured_stride_the_dry_run_contradicts(teacher: DiffusersTeacher) -> None:
    """The old six-level labels on the four-level UNet: its 32x32 map called "s4" would meet the student's 8x8."""
    from teachers.config import TapConfig

    wrong = [TapConfig(module="up_blocks.3", point="output", stride=4)]
    with pytest.raises(
        ValueError, match=r"up_blocks\.3 \(output\): configured stride 4, .*32x32 .*stride: 1"
    ):
        TeacherEncoder(
            teacher,
            wrong,
            mode="noise",
            t=50,
            ddim_steps=1,
            resolution=32,
            device="cpu",
            dtype_name="fp32",
            channels_last=False,
        )


def test_encoder_noise_mode_equals_manual_read_out(teacher: DiffusersTeacher) -> None:
    encoder = _encoder(teacher, "noise")
    assert [(i.name, i.channels, i.height) for i in encoder.taps_info] == [
        ("s8", 32, 4),  # four levels at 32 px: the maps are 4, 8, 16, 32 px, so strides 8, 4, 2, 1
        ("s4", 16, 8),
        ("s2", 16, 16),
        ("s1", 8, 32),
    ]
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = make_noise([1, 2], [False, False], (3, 32, 32))
    feats = encoder(x0, eps)
    xt = q_sample(x0, 50, eps, teacher.alphas_cumprod)
    with torch.no_grad(), FeatureTaps(teacher, teacher.default_taps()) as captured:
        teacher.predict_eps(xt, torch.full((2,), 50))
    assert set(feats) == {"s8", "s4", "s2", "s1"}
    for name, value in captured.features.items():
        assert feats[name].dtype == torch.float32
        torch.testing.assert_close(feats[name], value)
    # deterministic: same inputs, same bytes
    assert all(torch.equal(feats[n], f) for n, f in encoder(x0, eps).items())


def test_encoder_ddim_mode_reads_out_at_inverted_latent(teacher: DiffusersTeacher) -> None:
    encoder = _encoder(teacher, "ddim", t=30, ddim_steps=3)
    x0 = torch.rand(1, 3, 32, 32) * 2 - 1
    feats = encoder(x0, None)
    with torch.no_grad():
        xt = ddim_invert(teacher.predict_eps, x0, 30, 3, teacher.alphas_cumprod)
        with FeatureTaps(teacher, teacher.default_taps()) as captured:
            teacher.predict_eps(xt, torch.full((1,), 30))
    for name, value in captured.features.items():
        torch.testing.assert_close(feats[name], value)


def test_encoder_validates_its_settings(teacher: DiffusersTeacher) -> None:
    with pytest.raises(ValueError, match=r"encode.t=1000 is outside the teacher's timesteps \[0, 1000\)"):
        _encoder(teacher, "noise", t=1000)
    with pytest.raises(ValueError, match="encode.mode 'online'"):
        _encoder(teacher, "online")
    with pytest.raises(ValueError, match="ddim_steps=20 must be in"):
        _encoder(teacher, "ddim", t=10, ddim_steps=20)
    encoder = _encoder(teacher, "noise")
    with pytest.raises(ValueError, match="noise encoding needs eps"):
        encoder(torch.zeros(1, 3, 32, 32), None)
    with pytest.raises(ValueError, match="the encoder expects 32"):
        encoder(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


@pytest.mark.gpu
def test_cuda_bf16_channels_last_encoder_matches_cpu_float32() -> None:
    teacher = DiffusersTeacher.debug(32).eval().requires_grad_(False)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = make_noise([5, 6], [False, True], (3, 32, 32))
    cpu = _encoder(teacher, "noise")(x0, eps)
    teacher_cuda = DiffusersTeacher.debug(32).eval().requires_grad_(False).cuda()
    teacher_cuda.to(memory_format=torch.channels_last)
    encoder = TeacherEncoder(
        teacher_cuda,
        teacher_cuda.default_taps(),
        mode="noise",
        t=50,
        ddim_steps=3,
        resolution=32,
        device="cuda",
        dtype_name="bf16",
        channels_last=True,
    )
    gpu = encoder(x0, eps)
    for name, value in cpu.items():
        assert gpu[name].device.type == "cuda" and gpu[name].dtype == torch.float32
        rel = (gpu[name].cpu() - value).norm() / value.norm()
        assert rel < 5e-2, (name, float(rel))
