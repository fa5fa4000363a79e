"""Encoding real images with a frozen teacher: the stateless algorithms and one read-out orchestrator.

Two encodings (``docs/teachers.md`` has the derivations):

* ``noise`` (the paper's stochastic encoding): ``x_T = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps``, one UNet pass at T.
* ``ddim``: deterministic DDIM inversion (eta = 0) from x_0 to T on the grid ``tau_k = round(k T / S)``,
  then the same read-out pass at T.

Noise is reproducible anywhere: a row's seed is a sha256 of (global seed, image key, draw) and its noise is drawn
on CPU by a per-row ``torch.Generator``, so it does not depend on device, batch composition or process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from teachers.base import FeatureTaps, TapInfo, Teacher, autocast_for, discover_taps, last_firing_tap
from teachers.config import TapConfig

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict_eps(x_BCHW, t_B) -> eps_BCHW``."""

ENCODING_MODES = ("noise", "ddim")
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def q_sample(
    x0_BCHW: torch.Tensor, t: int, eps_BCHW: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward diffusion in closed form: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (float32, on x0's device).

    ``alphas_cumprod`` is read as a Python number: pass a CPU copy (``TeacherEncoder`` does) so reading it does
    not wait for the accelerator."""
    abar = float(alphas_cumprod[t])
    eps_BCHW = eps_BCHW.to(device=x0_BCHW.device, dtype=torch.float32)
    return abar**0.5 * x0_BCHW.float() + (1.0 - abar) ** 0.5 * eps_BCHW


def ddim_grid(t_end: int, steps: int) -> list[int]:
    """Inversion timesteps ``tau_k = round(k * t_end / steps)`` for k = 0..steps (tau_0 = 0, tau_steps = t_end)."""
    if steps < 1:
        raise ValueError(f"ddim_steps must be >= 1, got {steps}")
    if t_end < steps:
        raise ValueError(
            f"ddim inversion to t={t_end} cannot take {steps} distinct steps; use ddim_steps <= t"
        )
    return [round(k * t_end / steps) for k in range(steps + 1)]


def ddim_invert(
    predict_eps: EpsFn, x0_BCHW: torch.Tensor, t_end: int, steps: int, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM inversion (eta = 0) of clean images to timestep ``t_end`` in ``steps`` UNet calls.

    States x_0 (the clean image, abar = 1), x_1, ..., x_S on the grid of :func:`ddim_grid`. Step k = 1..S:
    ``eps = predict_eps(x_{k-1}, tau_{k-1})``; ``x0_hat = (x_{k-1} - sqrt(1 - a_{k-1}) eps) / sqrt(a_{k-1})``;
    ``x_k = sqrt(a_k) x0_hat + sqrt(1 - a_k) eps`` with ``a_0 = 1`` and ``a_k = abar[tau_k]``. The first step
    therefore evaluates the UNet on the clean image at t = 0 and gives ``x_1 = sqrt(a_1) x0 + sqrt(1 - a_1) eps``.
    (diffusers' DDIMInverseScheduler instead evaluates eps at the *target* timestep of each step; see the docs.)
    """
    grid = ddim_grid(t_end, steps)
    x_BCHW = x0_BCHW.float()
    abar_prev = 1.0
    for k in range(1, steps + 1):
        t_B = torch.full((x_BCHW.shape[0],), grid[k - 1], dtype=torch.long, device=x_BCHW.device)
        eps_BCHW = predict_eps(x_BCHW, t_B).float()
        abar_next = float(alphas_cumprod[grid[k]])
        x0_hat_BCHW = (x_BCHW - (1.0 - abar_prev) ** 0.5 * eps_BCHW) / abar_prev**0.5
        x_BCHW = abar_next**0.5 * x0_hat_BCHW + (1.0 - abar_next) ** 0.5 * eps_BCHW
        abar_prev = abar_next
    return x_BCHW


def row_seed(global_seed: int, key: str, draw: int) -> int:
    """A 63-bit seed from sha256("global_seed/draw/key"): identical on every machine and process."""
    digest = hashlib.sha256(f"{int(global_seed)}/{int(draw)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def fresh_seed(global_seed: int, key: str, visit: int, flip: int) -> int:
    """A 63-bit noise seed of one visit of one view, from sha256("fresh/seed/visit/flip/key"): fresh noise for
    online targets (``distill.targets=online``) and the feature interpreter's training draws.

    The ``fresh/`` prefix keeps these seeds apart from the bank's stored draws (:func:`row_seed`).
    """
    digest = hashlib.sha256(f"fresh/{int(global_seed)}/{int(visit)}/{int(flip)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_noise(seeds: Sequence[int], flips: Sequence[bool], shape_CHW: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (B, C, H, W) on CPU, one ``torch.Generator`` per row.

    A flipped row gets its seed's noise mirrored along W, so the noisy input of a flipped view is exactly the
    mirror of the unflipped view's: ``q_sample(flip(x0), t, flip(eps)) == flip(q_sample(x0, t, eps))``.
    """
    if len(seeds) != len(flips):
        raise ValueError(f"{len(seeds)} seeds but {len(flips)} flip flags")
    rows = []
    for seed, flip in zip(seeds, flips, strict=True):
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        eps_CHW = torch.randn(tuple(shape_CHW), generator=generator, dtype=torch.float32)
        rows.append(eps_CHW.flip(-1) if flip else eps_CHW)
    return torch.stack(rows) if rows else torch.empty((0, *shape_CHW))


class TeacherEncoder:
    """One read-out: encode a batch of clean images to x_T and return the teacher's features at the taps."""

    def __init__(
        self,
        teacher: Teacher,
        taps: list[TapConfig],
        *,
        mode: Literal["noise", "ddim"],
        t: int,
        ddim_steps: int,
        resolution: int,
        device: torch.device | str,
        dtype_name: Literal["bf16", "fp16", "fp32"],
        channels_last: bool,
        early_stop: bool = True,
        compile: bool = False,
    ) -> None:
        """``early_stop``: the read-out pass stops once the last tap has fired (the decoder above it and the output
        head never run; the taps' values are the same bit for bit). ``compile``: ``torch.compile`` the read-out
        pass (the first batch of each shape compiles it)."""
        if getattr(teacher, "synthesizes", False):
            raise ValueError(
                f"{type(teacher).__name__} synthesizes its images and cannot encode real ones; use "
                "teachers.synthesis.GANSynthesizer (dreamteacher encode does, for a gan teacher)"
            )
        problems = []
        if mode not in ENCODING_MODES:
            problems.append(f"encode.mode {mode!r}: valid choices are {', '.join(ENCODING_MODES)}")
        if not 0 <= t < teacher.num_train_timesteps:
            problems.append(
                f"encode.t={t} is outside the teacher's timesteps [0, {teacher.num_train_timesteps})"
            )
        elif mode == "ddim" and (ddim_steps < 1 or ddim_steps > t):
            problems.append(f"encode.ddim_steps={ddim_steps} must be in [1, t={t}] for ddim inversion")
        if dtype_name not in DTYPE_NAMES:
            problems.append(f"teacher.dtype {dtype_name!r}: valid choices are {', '.join(DTYPE_NAMES)}")
        if problems:
            raise ValueError("\n".join(problems))
        self.teacher = teacher
        self.taps = list(taps)
        self.mode = mode
        self.t = t
        self.ddim_steps = ddim_steps
        self.resolution = resolution
        self.device = torch.device(device)
        self.dtype_name = dtype_name
        self.channels_last = channels_last and self.device.type == "cuda"
        self.noise_shape: tuple[int, int, int] = teacher.noise_shape(resolution)
        """(C, H, W) of a row's noise: the image's, or a latent teacher's latent (``Teacher.noise_shape``)."""
        self.taps_info: list[TapInfo] = discover_taps(teacher, self.taps, resolution, self.device)
        self.early_stop = early_stop
        last = last_firing_tap(teacher, self.taps, resolution, self.device) if early_stop else None
        self.stop_after: str | None = None if last is None else self.taps_info[last].name
        """Level whose tap ends the read-out pass (None: the whole forward runs)."""
        self._hooks = FeatureTaps(teacher, self.taps, stop_after=self.stop_after)
        # The schedule on the CPU: q_sample and ddim_invert read abar_t as Python numbers, which from a CUDA
        # buffer would block the host on the GPU once per batch.
        self._abar = teacher.alphas_cumprod.detach().to("cpu", torch.float64)
        self.compiled = compile
        self._readout = torch.compile(self._readout_pass) if compile else self._readout_pass

    def _readout_pass(self, xt_BCHW: torch.Tensor, t_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hooked UNet pass at T (stopped after ``stop_after``): {level: features as the teacher made them}."""
        return dict(self._hooks.run(self.teacher.predict_eps, xt_BCHW, t_B))

    @torch.inference_mode()
    def __call__(
        self, x0_BCHW: torch.Tensor, eps_BCHW: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Features {level name: (B, C, h, w) float32 on the device}; ``noise`` mode needs ``eps``."""
        # 1. clean images on the device, in the memory format the teacher runs in
        x0_BCHW = x0_BCHW.to(self.device, dtype=torch.float32, non_blocking=True)
        if x0_BCHW.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(
                f"images are {tuple(x0_BCHW.shape[-2:])}, the encoder expects {self.resolution}^2"
            )
        if self.channels_last:
            x0_BCHW = x0_BCHW.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device, self.dtype_name):
            # 2. encode to x_T (in latent space for a latent-diffusion teacher: x0 becomes its scaled VAE latent)
            x0_BCHW = self.teacher.to_diffusion_space(x0_BCHW)
            if self.mode == "noise":
                if eps_BCHW is None:
                    raise ValueError("noise encoding needs eps (make_noise(row seeds, flips, noise_shape))")
                if eps_BCHW.shape != x0_BCHW.shape:
                    raise ValueError(
                        f"eps has shape {tuple(eps_BCHW.shape)}, the teacher diffuses {tuple(x0_BCHW.shape)}: draw it "
                        "with make_noise(seeds, flips, encoder.noise_shape) (a latent teacher's noise is latent-shaped)"
                    )
                xt_BCHW = q_sample(x0_BCHW, self.t, eps_BCHW, self._abar)
            else:  # the inversion's steps need the whole eps: only the final read-out stops early
                xt_BCHW = ddim_invert(self.teacher.predict_eps, x0_BCHW, self.t, self.ddim_steps, self._abar)
            # 3. one read-out pass at T with the taps hooked
            t_B = torch.full((x0_BCHW.shape[0],), self.t, dtype=torch.long, device=self.device)
            features = self._readout(xt_BCHW, t_B)
        return {name: feats.float().contiguous() for name, feats in features.items()}


def readout_flops(encoder: TeacherEncoder, views: int = 1) -> int:
    """FLOPs of one ``encoder`` call on ``views`` blank views, as ``torch.utils.flop_counter.FlopCounterMode`` counts
    them (convolutions, matmuls, attention; 2 per multiply-add). On the meta device it counts without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    x0_BCHW = torch.zeros(views, 3, encoder.resolution, encoder.resolution, device=encoder.device)
    eps_BCHW = torch.zeros(views, *encoder.noise_shape, device=encoder.device)
    with FlopCounterMode(display=False) as counter:
        encoder(x0_BCHW, eps_BCHW if encoder.mode == "noise" else None)
    return int(counter.get_total_flops())
