"""ADM, the UNet of openai/guided-diffusion ("Diffusion Models Beat GANs"), written for this project.

guided-diffusion is not pip-installable and carries training-only machinery (gradient checkpointing, fp16 master
weights), so the network is re-implemented here from the paper and the released checkpoints' structure. Module
names reproduce the original state dict exactly (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``; ResBlock ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``;
AttentionBlock ``norm`` / ``qkv`` / ``proj_out``; Upsample ``conv``, Downsample ``op``), so a released ``.pt`` file
loads with ``load_state_dict`` and no renaming. ``tests/test_adm.py`` checks the function against activations of the
original code.

Build from guided-diffusion's command-line flags with :func:`adm_from_flags`; :class:`ADMTeacher` wraps the network
with its noise schedule as a :class:`teachers.base.Teacher`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from configlib import from_mapping
from teachers.adm_presets import preset_flags
from teachers.base import TapInfo, Teacher, discover_taps
from teachers.config import TapConfig
from teachers.schedules import make_alphas_cumprod

NUM_IMAGENET_CLASSES = 1000
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
"""guided-diffusion's ``channel_mult=""`` defaults per image size."""


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ADMFlags:
    """guided-diffusion ``create_model`` flags (same names and defaults) plus the diffusion schedule flags."""

    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: str = ""
    """Comma-separated multipliers; "" = guided-diffusion's default for ``image_size``."""
    learn_sigma: bool = False
    """Six output channels (epsilon, then the variance interpolation); epsilon = the first 3."""
    class_cond: bool = False
    attention_resolutions: str = "16"
    """Feature-map sizes (not strides) with self-attention, comma-separated."""
    num_heads: int = 1
    num_head_channels: int = -1
    """Channels per head; -1 = use ``num_heads``."""
    num_heads_upsample: int = -1
    """Heads in decoder attention; -1 = ``num_heads``."""
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    """The original stores the UNet body in fp16. Here weights stay float32 and the precision on CUDA is the
    autocast dtype ``teacher.dtype`` (bf16 or fp16; GroupNorm and softmax run in float32 as in the original)."""
    use_new_attention_order: bool = False
    use_checkpoint: bool = False
    """Gradient checkpointing in the original; irrelevant for a frozen teacher, accepted so flag files load."""
    noise_schedule: Literal["linear", "cosine"] = "linear"
    diffusion_steps: int = 1000

    @classmethod
    def from_mapping(cls, flags: Mapping[str, Any]) -> ADMFlags:
        """Validate a flag dict (a preset merged with ``teacher.flags``, or a ``flags.json``): unknown names, wrong
        types and missing required flags are one ConfigError naming each ``teacher.flags.<name>``."""
        return from_mapping(cls, dict(flags), "teacher.flags")

    def channel_multipliers(self) -> tuple[float, ...]:
        if self.channel_mult == "":
            if self.image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size {self.image_size} "
                    f"(defaults exist for {sorted(DEFAULT_CHANNEL_MULT)}); set the channel_mult flag"
                )
            return DEFAULT_CHANNEL_MULT[self.image_size]
        return tuple(float(m) if "." in m else int(m) for m in str(self.channel_mult).split(","))

    def attention_strides(self) -> tuple[int, ...]:
        """``attention_resolutions`` converted to downsampling factors, as ``create_model`` does."""
        return tuple(self.image_size // int(res) for res in str(self.attention_resolutions).split(",") if res)

    @property
    def out_channels(self) -> int:
        return 6 if self.learn_sigma else 3

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f_i = max_period^(-i / half)``; (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    )
    args_BH = t_B[:, None].float() * freqs[None]
    emb_BD = torch.cat([torch.cos(args_BH), torch.sin(args_BH)], dim=-1)
    if dim % 2:
        emb_BD = torch.cat([emb_BD, torch.zeros_like(emb_BD[:, :1])], dim=-1)
    return emb_BD


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the input dtype (as the original)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """Marker base: a module whose ``forward(x, emb)`` also takes the timestep embedding."""


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: strided 3x3 conv (``op``) or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up`` / ``down``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        *,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        # The original's use_conv skip option is never enabled by create_model: 1x1 conv when channels change.
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # 1. norm + SiLU, resample (both paths), conv
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        # 2. inject the timestep embedding: additive, or as a FiLM scale/shift after the norm
        emb_out_BC11 = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out_BC11, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out_BC11)
        return self.skip_connection(x) + h


ATTENTION_IMPLS = ("sdpa", "einsum")


def _attention(
    q_NCT: torch.Tensor, k_NCT: torch.Tensor, v_NCT: torch.Tensor, impl: str = "sdpa"
) -> torch.Tensor:
    """Softmax attention over T positions for N = batch*heads; (N, C, T) -> (N, C, T).

    ``sdpa``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA; the scores are never
    materialised); ``einsum``: the original's two einsums with the softmax in float32. The same function (within
    float32 rounding)."""
    if impl == "sdpa":
        out_NTC = F.scaled_dot_product_attention(
            q_NCT.transpose(1, 2), k_NCT.transpose(1, 2), v_NCT.transpose(1, 2)
        )
        return out_NTC.transpose(1, 2)
    scale = 1 / math.sqrt(math.sqrt(q_NCT.shape[1]))  # split between q and k, as the original (fp16 range)
    weight_NTS = torch.einsum("bct,bcs->bts", q_NCT * scale, k_NCT * scale)
    weight_NTS = torch.softmax(weight_NTS.float(), dim=-1).type(weight_NTS.dtype)
    return torch.einsum("bts,bcs->bct", weight_NTS, v_NCT)


class QKVAttentionLegacy(nn.Module):
    """Legacy head layout: qkv channels grouped per head as [q_h, k_h, v_h] (the released checkpoints)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.impl = "sdpa"
        """``sdpa`` or ``einsum`` (:func:`set_attention`)."""

    def forward(self, qkv_BWT: torch.Tensor) -> torch.Tensor:
        b, width, length = qkv_BWT.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv_BWT.reshape(b * self.n_heads, ch * 3, length).split(ch, dim=1)
        return _attention(q, k, v, self.impl).reshape(b, -1, length)


class QKVAttention(nn.Module):
    """New head layout (``use_new_attention_order``): qkv channels grouped as [q (all heads), k, v]."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.impl = "sdpa"
        """``sdpa`` or ``einsum`` (:func:`set_attention`)."""

    def forward(self, qkv_BWT: torch.Tensor) -> torch.Tensor:
        b, width, length = qkv_BWT.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (p.reshape(b * self.n_heads, ch, length) for p in qkv_BWT.chunk(3, dim=1))
        return _attention(q, k, v, self.impl).reshape(b, -1, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection; ``qkv`` and ``proj_out`` are 1x1 conv1d."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels == -1:
            heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"{channels} channels are not divisible by num_head_channels={num_head_channels}"
                )
            heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(heads) if use_new_attention_order else QKVAttentionLegacy(heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x_BCHW.shape
        x_BCT = x_BCHW.reshape(b, c, -1)
        h_BCT = self.proj_out(self.attention(self.qkv(self.norm(x_BCT))))
        return (x_BCT + h_BCT).reshape(b, c, *spatial)


# ----------------------------------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------------------------------
class ADMUNet(nn.Module):
    """guided-diffusion's ``UNetModel`` (2D, images), built from :class:`ADMFlags`."""

    def __init__(self, flags: ADMFlags) -> None:
        super().__init__()
        self.flags = flags
        mults = flags.channel_multipliers()
        attn_ds = flags.attention_strides()
        mc = flags.num_channels
        heads_up = flags.num_heads if flags.num_heads_upsample == -1 else flags.num_heads_upsample
        self.model_channels = mc
        self.num_classes = NUM_IMAGENET_CLASSES if flags.class_cond else None
        emb_dim = mc * 4

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_dim, flags.dropout, ch_out, use_scale_shift_norm=flags.use_scale_shift_norm, **kw
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, flags.num_head_channels, flags.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(self.num_classes, emb_dim)

        # Encoder: conv stem, then per level num_res_blocks (ResBlock [+ attention]) and a downsampler.
        ch = input_ch = int(mults[0] * mc)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(mults):
            for _ in range(flags.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in attn_ds:
                    layers.append(attn(ch, flags.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mults) - 1:
                down = res(ch, ch, down=True) if flags.resblock_updown else Downsample(ch, True, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, flags.num_heads), res(ch, ch))

        # Decoder: per level num_res_blocks + 1 blocks, each consuming one skip; the last one upsamples.
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(flags.num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in attn_ds:
                    layers.append(attn(ch, heads_up))
                if level and i == flags.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if flags.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, flags.out_channels, 3, padding=1)
        )

    def forward(
        self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Model output (B, 3 or 6, H, W) for images ``x`` at integer timesteps ``t`` (and class labels ``y``)."""
        if (y_B is not None) != (self.num_classes is not None):
            raise ValueError("class labels must be given if and only if the model is class-conditional")
        # 1. timestep (+ class) embedding, in float32 as the original's fp16 mode keeps it
        with _float32_region(x_BCHW.device):
            emb = self.time_embed(timestep_embedding(t_B, self.model_channels))
            if y_B is not None:
                emb = emb + self.label_emb(y_B)
        # 2. encoder, keeping every block's output for the skips
        skips = []
        h = x_BCHW
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        # 3. middle, then decoder blocks on [h, skip] concatenated along channels
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        # 4. output head, in float32 (the original casts back before ``out``)
        with _float32_region(x_BCHW.device):
            return self.out(h.float())

    def upsampling_layer_index(self, block: int) -> int | None:
        """Index of the upsampling layer inside ``output_blocks[block]``, or None if the block does not upsample."""
        last = len(self.output_blocks[block]) - 1
        layer = self.output_blocks[block][last]
        is_up = isinstance(layer, Upsample) or (
            isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample)
        )
        return last if is_up else None


def set_attention(unet: nn.Module, impl: str) -> None:
    """Select the attention implementation (``sdpa`` or ``einsum``) of every attention layer of an ADM."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"teacher.attention {impl!r}: valid choices are {', '.join(ATTENTION_IMPLS)}")
    for module in unet.modules():
        if isinstance(module, (QKVAttention, QKVAttentionLegacy)):
            module.impl = impl


def _float32_region(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Disable autocast (if active) so a region runs in float32, like the fp32 parts of the original fp16 model."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def adm_from_flags(flags: ADMFlags | Mapping[str, Any], device: torch.device | str = "cpu") -> ADMUNet:
    """Build the network (random init) from flags; ``device="meta"`` builds without allocating memory."""
    flags = flags if isinstance(flags, ADMFlags) else ADMFlags.from_mapping(flags)
    with torch.device(device):
        return ADMUNet(flags)


def adm_default_taps(unet: ADMUNet) -> list[TapConfig]:
    """The paper's taps: the last block of each of the four lowest-resolution decoder levels, before its upsampler.

    For ADM-256 these are ``output_blocks[2, 5, 8, 11]`` (strides 32, 16, 8, 4). A level's last block that does
    not upsample (the final level of a 4-level model) is read at its output.
    """
    per_level = unet.flags.num_res_blocks + 1
    levels = len(unet.flags.channel_multipliers())
    if levels < 4:
        raise ValueError(
            f"the ADM has {levels} resolution levels; the default taps need 4 (choose taps explicitly)"
        )
    taps = []
    for level, stride in enumerate((32, 16, 8, 4)):
        block = per_level * (level + 1) - 1
        up = unet.upsampling_layer_index(block)
        if up is None:
            taps.append(TapConfig(module=f"output_blocks.{block}", point="output", stride=stride))
        else:
            taps.append(TapConfig(module=f"output_blocks.{block}.{up}", point="input", stride=stride))
    return taps


# ----------------------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------------------
class ADMTeacher(Teacher):
    """A guided-diffusion ADM checkpoint as a frozen teacher (epsilon = first 3 output channels when learn_sigma)."""

    def __init__(
        self,
        unet: ADMUNet,
        *,
        class_label: int | None = None,
        checkpoint: str = "",
        preset: str = "",
    ) -> None:
        super().__init__()
        flags = unet.flags
        if flags.class_cond and class_label is None:
            raise ValueError(
                "this ADM is class-conditional (class_cond=True): set teacher.class_label to an ImageNet class "
                f"index in [0, {NUM_IMAGENET_CLASSES}) used for every image"
            )
        if not flags.class_cond and class_label is not None:
            raise ValueError(
                f"teacher.class_label={class_label} is set but this ADM is unconditional; remove it"
            )
        if class_label is not None and not 0 <= class_label < NUM_IMAGENET_CLASSES:
            raise ValueError(f"teacher.class_label={class_label} is outside [0, {NUM_IMAGENET_CLASSES})")
        self.unet = unet
        self.resolution = flags.image_size
        self.class_label = class_label
        self.checkpoint = checkpoint
        self.preset = preset
        self.weight_files = (Path(checkpoint),) if checkpoint else ()
        self.register_buffer(
            "alphas_cumprod",
            make_alphas_cumprod(flags.noise_schedule, flags.diffusion_steps),
            persistent=False,
        )

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        flags: ADMFlags | Mapping[str, Any],
        *,
        class_label: int | None = None,
        preset: str = "",
        key: str = "teachers.<name>.checkpoint",
    ) -> ADMTeacher:
        """Build from flags and load the original guided-diffusion state dict (``torch.save(model.state_dict())``).

        ``key`` is the config key the checkpoint came from, for the not-found message."""
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(
                f"ADM checkpoint {str(path)!r} not found ({key}); download e.g. 256x256_diffusion_uncond.pt from "
                f"openai/guided-diffusion and point {key} (in pipeline.yaml: ${{ADM_CKPT}}) at it, "
                "e.g. `export ADM_CKPT=/path/to/256x256_diffusion_uncond.pt`"
            )
        unet = adm_from_flags(flags)
        state = torch.load(path, map_location="cpu", weights_only=True)
        # 1. compare names and shapes first: one message listing every difference (load_state_dict stops early)
        expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        mismatched = [
            f"{k}: {tuple(state[k].shape)} vs {expected[k]}"
            for k in expected
            if k in state and tuple(state[k].shape) != expected[k]
        ]
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{path} does not match the ADM built from the flags {unet.flags.as_dict()}: "
                f"missing {missing[:6]} (of {len(missing)}), unexpected {unexpected[:6]} (of {len(unexpected)}), "
                f"shape (checkpoint vs flags) {mismatched[:6]} (of {len(mismatched)}). "
                "Check the preset / teacher.flags against the flags the checkpoint was trained with."
            )
        # 2. load the original names as they are
        unet.load_state_dict(state)
        return cls(unet, class_label=class_label, checkpoint=str(path), preset=preset)

    @property
    def tap_root(self) -> nn.Module:
        return self.unet

    def predict_eps(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        y_B = None
        if self.class_label is not None:
            y_B = torch.full((x_BCHW.shape[0],), self.class_label, dtype=torch.long, device=x_BCHW.device)
        out_BCHW = self.unet(x_BCHW, t_B, y_B)
        return out_BCHW[:, :3]  # learn_sigma: channels 3..5 are the variance interpolation

    def default_taps(self) -> list[TapConfig]:
        return adm_default_taps(self.unet)

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "adm",
            "preset": self.preset,
            "path": self.checkpoint,
            "flags": self.unet.flags.as_dict(),
            "class_label": self.class_label,
            "weights_sha256": self.weights_sha256,
        }


def adm_tap_shapes(preset_or_flags: str | ADMFlags | Mapping[str, Any]) -> list[TapInfo]:
    """Default taps' (channels, height, width) at the native resolution, by a dry run on the ``meta`` device.

    ``adm_tap_shapes("adm-256-uncond")`` -> 1024x8x8, 1024x16x16, 512x32x32, 512x64x64 without allocating weights.
    """
    flags = preset_flags(preset_or_flags) if isinstance(preset_or_flags, str) else preset_or_flags
    unet = adm_from_flags(flags, device="meta")
    class_label = 0 if unet.flags.class_cond else None
    teacher = ADMTeacher(unet, class_label=class_label)
    teacher.alphas_cumprod = teacher.alphas_cumprod.to("meta")
    return discover_taps(teacher, teacher.default_taps(), unet.flags.image_size, device="meta")
