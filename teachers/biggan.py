"""BigGAN-deep's generator, written for this project, loading pytorch-pretrained-biggan's released checkpoints.

The function is the one ``pytorch_pretrained_biggan.BigGAN`` (the PyTorch port of DeepMind's TF-Hub BigGAN-deep)
computes in eval mode; module and parameter names reproduce its state dict (``embeddings``, ``generator.gen_z``,
``generator.layers.{i}.bn_{0..3}`` / ``conv_{0..3}``, the attention layer's ``snconv1x1_*`` and ``gamma``,
``generator.bn``, ``generator.conv_to_rgb``), so a released ``pytorch_model.bin`` loads strictly, without renaming,
through ``torch.load(..., weights_only=True)``. ``tests/test_biggan.py`` matches the original code's image and every
generator stage (``tests/data/biggan-tiny``).

What the original computes, and we reproduce:

* **Spectral norm in eval mode**: each layer stores ``weight_orig`` and the power-iteration vectors ``weight_u``,
  ``weight_v``; the weight used is ``weight_orig / sigma`` with ``sigma = u^T W v`` (``W`` = ``weight_orig`` reshaped
  to (out, -1)). No power iteration runs at inference, so the stored vectors *are* the checkpoint's sigma.
* **Conditional batch norm with pre-computed statistics**: every BN holds ``n_stats`` (51) rows of running
  mean / var, one per truncation in {0, 1/50, ..., 1}. For truncation ``tr``, ``coef, i = modf(tr * 50)``; if ``coef``
  is 0 row ``i`` is used, else ``coef * stats[i] + (1 - coef) * stats[i + 1]`` (sic: the original's weights, which
  favour row ``i + 1`` when ``tr`` is just above row ``i``; it is the function the released weights were ported
  with, so we keep it). Scale and offset are spectral-normed linear maps of the condition vector:
  ``(x - mean) / sqrt(var + eps) * (1 + scale(c)) + offset(c)``. The final BN is unconditional (weight, bias).
* **Condition vector** ``c = [z, embeddings(one_hot_class)]`` (``embeddings`` a bias-free linear, not
  spectral-normed), fed whole to every block (BigGAN-deep does not split z).
* **GenBlock** (bottleneck residual, channel ratio 1/4): BN-ReLU-conv1x1, BN-ReLU-[nearest 2x]-conv3x3,
  BN-ReLU-conv3x3, BN-ReLU-conv1x1; the skip keeps the first half of the channels when the width drops and is
  upsampled (nearest) with the block.
* **Self-attention** (SAGAN, max-pooled keys / values, ``x + gamma * o``) before block ``attention_layer_position``.
* ``gen_z``: linear to 4 x 4 x 16ch, read as TF's NHWC then permuted to NCHW; after the blocks: BN, ReLU, conv3x3
  to ``ch`` channels, the first three kept, tanh.

The layout (blocks, up-sampling flags, widths, attention position, output size) comes from ``config.json``; a
layout whose up-sampling count contradicts ``output_dim`` is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"


@dataclass(kw_only=True)
class BigGANConfig:
    """``config.json`` of a pytorch-pretrained-biggan checkpoint (same keys; defaults are biggan-deep-128's)."""

    output_dim: int = 128
    z_dim: int = 128
    class_embed_dim: int = 128
    channel_width: int = 128
    num_classes: int = 1000
    layers: list[tuple[bool, int, int]] = field(default_factory=list)
    """Per GenBlock: (up-sample?, input width, output width), widths in units of ``channel_width``."""
    attention_layer_position: int = 8
    """Self-attention is inserted before this GenBlock (none if it is past the last block)."""
    eps: float = 1e-4
    n_stats: int = 51

    @classmethod
    def from_json_file(cls, path: str | Path) -> BigGANConfig:
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown BigGAN config keys {unknown}; expected a subset of {sorted(known)}"
            )
        cfg = cls(**data)
        cfg.layers = [(bool(up), int(cin), int(cout)) for up, cin, cout in cfg.layers]
        cfg.validate(str(path))
        return cfg

    def validate(self, where: str = "BigGAN config") -> None:
        """The layout must produce ``output_dim``: 4 px doubled once per up-sampling block."""
        if not self.layers:
            raise ValueError(f"{where}: 'layers' is empty")
        for i, (prev, cur) in enumerate(zip(self.layers, self.layers[1:], strict=False)):
            if prev[2] != cur[1]:
                raise ValueError(
                    f"{where}: layers[{i}] outputs width {prev[2]} but layers[{i + 1}] takes {cur[1]}"
                )
        if self.layers[0][1] != 16:
            raise ValueError(
                f"{where}: layers[0] must take width 16 (gen_z outputs 4x4x16ch), got {self.layers[0][1]}"
            )
        size = 4 * 2 ** sum(up for up, _, _ in self.layers)
        if size != self.output_dim:
            raise ValueError(
                f"{where}: the layers up-sample 4 px to {size} px, but output_dim is {self.output_dim}"
            )
        if self.n_stats < 2:
            raise ValueError(f"{where}: n_stats must be >= 2, got {self.n_stats}")

    @property
    def stage_sizes(self) -> list[int]:
        """Feature size after each module of ``generator.layers`` (attention included), at ``output_dim`` px."""
        sizes, size = [], 4
        for i, (up, _, _) in enumerate(self.layers):
            if i == self.attention_layer_position:
                sizes.append(size)
            size *= 2 if up else 1
            sizes.append(size)
        return sizes

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [list(layer) for layer in self.layers]
        return data


class _SpectralNorm(nn.Module):
    """The eval-mode weight of ``torch.nn.utils.spectral_norm``: ``weight_orig / (u^T W v)``, stored u, v."""

    weight_u: torch.Tensor
    weight_v: torch.Tensor

    def _init_sn(self, shape: tuple[int, ...]) -> None:
        self.weight_orig = nn.Parameter(torch.empty(shape))
        self.register_buffer("weight_u", torch.empty(shape[0]))
        self.register_buffer("weight_v", torch.empty(math.prod(shape[1:])))

    def weight(self) -> torch.Tensor:
        w_OI = self.weight_orig.reshape(self.weight_orig.shape[0], -1)
        sigma = torch.dot(self.weight_u, torch.mv(w_OI, self.weight_v))
        return self.weight_orig / sigma


class SNLinear(_SpectralNorm):
    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__()
        self._init_sn((out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x_BI: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BI, self.weight(), self.bias)


class SNConv2d(_SpectralNorm):
    def __init__(self, cin: int, cout: int, kernel: int, *, bias: bool = True) -> None:
        super().__init__()
        self._init_sn((cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.padding = kernel // 2

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x_BCHW, self.weight(), self.bias, padding=self.padding)


def truncation_stats(
    means_SC: torch.Tensor, vars_SC: torch.Tensor, truncation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean / var for ``truncation`` from the ``n_stats`` pre-computed rows (the original's rule)."""
    if not 0.0 < truncation <= 1.0:
        raise ValueError(f"BigGAN truncation must be in (0, 1], got {truncation}")
    step = 1.0 / (means_SC.shape[0] - 1)
    coef, start = math.modf(truncation / step)
    i = int(start)
    if coef != 0.0:
        return (
            means_SC[i] * coef + means_SC[i + 1] * (1 - coef),
            vars_SC[i] * coef + vars_SC[i + 1] * (1 - coef),
        )
    return means_SC[i], vars_SC[i]


class BigGANBatchNorm(nn.Module):
    """Batch norm with truncation-indexed statistics; conditional (scale / offset from c) or plain affine."""

    def __init__(self, channels: int, cond_dim: int | None, n_stats: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_means", torch.zeros(n_stats, channels))
        self.register_buffer("running_vars", torch.ones(n_stats, channels))
        self.conditional = cond_dim is not None
        if cond_dim is not None:
            self.scale = SNLinear(cond_dim, channels, bias=False)
            self.offset = SNLinear(cond_dim, channels, bias=False)
        else:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self, x_BCHW: torch.Tensor, truncation: float, cond_BD: torch.Tensor | None = None
    ) -> torch.Tensor:
        mean_C, var_C = truncation_stats(self.running_means, self.running_vars, truncation)
        if not self.conditional:
            return F.batch_norm(x_BCHW, mean_C, var_C, self.weight, self.bias, training=False, eps=self.eps)
        if cond_BD is None:
            raise ValueError("conditional BigGAN batch norm needs the condition vector")
        gain_BC11 = 1 + self.scale(cond_BD)[:, :, None, None]
        bias_BC11 = self.offset(cond_BD)[:, :, None, None]
        normed = (x_BCHW - mean_C[None, :, None, None]) / torch.sqrt(var_C[None, :, None, None] + self.eps)
        return normed * gain_BC11 + bias_BC11


class SelfAttn(nn.Module):
    """SAGAN self-attention: queries at every position, keys / values max-pooled 2x2; ``x + gamma * o``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.snconv1x1_theta = SNConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_phi = SNConv2d(channels, channels // 8, 1, bias=False)
        self.snconv1x1_g = SNConv2d(channels, channels // 2, 1, bias=False)
        self.snconv1x1_o_conv = SNConv2d(channels // 2, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_BCHW.shape
        theta_BKN = self.snconv1x1_theta(x_BCHW).reshape(b, c // 8, h * w)
        phi_BKM = F.max_pool2d(self.snconv1x1_phi(x_BCHW), 2).reshape(b, c // 8, h * w // 4)
        attn_BNM = torch.softmax(torch.bmm(theta_BKN.transpose(1, 2), phi_BKM), dim=-1)
        g_BGM = F.max_pool2d(self.snconv1x1_g(x_BCHW), 2).reshape(b, c // 2, h * w // 4)
        o_BGN = torch.bmm(g_BGM, attn_BNM.transpose(1, 2)).reshape(b, c // 2, h, w)
        return x_BCHW + self.gamma * self.snconv1x1_o_conv(o_BGN)


class GenBlock(nn.Module):
    """BigGAN-deep's bottleneck residual block (see the module docstring)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, *, up: bool, n_stats: int, eps: float) -> None:
        super().__init__()
        mid = cin // 4
        self.up = up
        self.bn_0 = BigGANBatchNorm(cin, cond_dim, n_stats, eps)
        self.conv_0 = SNConv2d(cin, mid, 1)
        self.bn_1 = BigGANBatchNorm(mid, cond_dim, n_stats, eps)
        self.conv_1 = SNConv2d(mid, mid, 3)
        self.bn_2 = BigGANBatchNorm(mid, cond_dim, n_stats, eps)
        self.conv_2 = SNConv2d(mid, mid, 3)
        self.bn_3 = BigGANBatchNorm(mid, cond_dim, n_stats, eps)
        self.conv_3 = SNConv2d(mid, cout, 1)

    def forward(self, x_BCHW: torch.Tensor, cond_BD: torch.Tensor, truncation: float) -> torch.Tensor:
        h = self.conv_0(F.relu(self.bn_0(x_BCHW, truncation, cond_BD)))
        h = F.relu(self.bn_1(h, truncation, cond_BD))
        if self.up:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv_1(h)
        h = self.conv_2(F.relu(self.bn_2(h, truncation, cond_BD)))
        h = self.conv_3(F.relu(self.bn_3(h, truncation, cond_BD)))
        skip = x_BCHW
        if skip.shape[1] != h.shape[1]:
            # the original drops to half the channels whenever the width changes (BigGAN-deep halves widths)
            skip = skip[:, : skip.shape[1] // 2]
        if self.up:
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        return h + skip


class Generator(nn.Module):
    def __init__(self, cfg: BigGANConfig) -> None:
        super().__init__()
        ch, cond_dim = cfg.channel_width, cfg.z_dim * 2
        self.channel_width = ch
        self.gen_z = SNLinear(cond_dim, 4 * 4 * 16 * ch)
        layers: list[nn.Module] = []
        for i, (up, cin, cout) in enumerate(cfg.layers):
            if i == cfg.attention_layer_position:
                layers.append(SelfAttn(ch * cin))
            layers.append(GenBlock(ch * cin, ch * cout, cond_dim, up=up, n_stats=cfg.n_stats, eps=cfg.eps))
        self.layers = nn.ModuleList(layers)
        self.bn = BigGANBatchNorm(ch * cfg.layers[-1][2], None, cfg.n_stats, cfg.eps)
        self.conv_to_rgb = SNConv2d(ch * cfg.layers[-1][2], ch * cfg.layers[-1][2], 3)

    def forward(self, cond_BD: torch.Tensor, truncation: float) -> torch.Tensor:
        h = self.gen_z(cond_BD)
        h = h.reshape(-1, 4, 4, 16 * self.channel_width).permute(0, 3, 1, 2).contiguous()  # TF NHWC -> NCHW
        for layer in self.layers:
            h = layer(h, cond_BD, truncation) if isinstance(layer, GenBlock) else layer(h)
        h = self.conv_to_rgb(F.relu(self.bn(h, truncation)))
        return torch.tanh(h[:, :3])


class BigGAN(nn.Module):
    """``image_B3HW = BigGAN(cfg)(z_BZ, class_one_hot_BK, truncation)`` in [-1, 1]."""

    def __init__(self, cfg: BigGANConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embeddings = nn.Linear(cfg.num_classes, cfg.z_dim, bias=False)
        self.generator = Generator(cfg)

    def forward(self, z_BZ: torch.Tensor, class_BK: torch.Tensor, truncation: float) -> torch.Tensor:
        cond_BD = torch.cat([z_BZ, self.embeddings(class_BK)], dim=1)
        return self.generator(cond_BD, float(truncation))

    @classmethod
    def from_folder(cls, folder: str | Path, *, key: str = "teachers.<name>.path") -> BigGAN:
        """Build from ``config.json`` and load ``pytorch_model.bin`` (``weights_only=True``, strict names)."""
        folder = Path(folder)
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        missing = [p.name for p in (config_file, weights_file) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"BigGAN folder {str(folder)!r} ({key}) lacks {missing}; it must hold config.json and "
                "pytorch_model.bin as released by pytorch-pretrained-biggan (biggan-deep-128/256/512: "
                "biggan-deep-<size>-config.json and -pytorch_model.bin renamed to those two names)"
            )
        model = cls(BigGANConfig.from_json_file(config_file))
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing_keys = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [
            f"{k}: {tuple(state[k].shape)} vs {expected[k]}"
            for k in expected
            if k in state and tuple(state[k].shape) != expected[k]
        ]
        if missing_keys or unexpected or mismatched:
            raise ValueError(
                f"{weights_file} does not match the BigGAN built from {config_file}: missing {missing_keys[:6]} "
                f"(of {len(missing_keys)}), unexpected {unexpected[:6]} (of {len(unexpected)}), shape (checkpoint "
                f"vs config) {mismatched[:6]} (of {len(mismatched)})"
            )
        model.load_state_dict(state)
        return model


def truncated_normal(generator: torch.Generator, shape: tuple[int, ...], truncation: float) -> torch.Tensor:
    """``truncation * N(0, 1)`` restricted to [-2, 2] (the distribution of the original ``truncated_noise_sample``,
    drawn by rejection from a torch generator so it is reproducible without scipy)."""
    out = torch.randn(shape, generator=generator)
    bad = out.abs() > 2
    while bool(bad.any()):
        out[bad] = torch.randn(int(bad.sum()), generator=generator)
        bad = out.abs() > 2
    return out * truncation
