"""Feature codecs: how one level's float features become the arrays stored per row, and back.

A codec encodes a whole shard ``(S, C, H, W)`` on the tensor's own device (the GPU during encoding) and
decodes on whatever device the payload was moved to (the GPU during training, after the transfer of the small
encoded arrays). Every codec is covered by the shared contract tests in ``tests/test_bank_codecs.py``.

Registry: ``CODECS`` (name -> class). Lossless byte compressors that zarr applies on top: ``COMPRESSORS``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numcodecs
import numpy as np
import torch
import zarr.codecs

from bank.spec import BankError, LevelSpec

FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0**-14


@dataclass(frozen=True)
class Part:
    """One stored array of a codec: numpy dtype and per-row shape."""

    dtype: str
    row_shape: tuple[int, ...]


class Codec(abc.ABC):
    """Encode ``feats_SCHW`` (float, any device) into named parts; decode the parts back to float."""

    name: ClassVar[str]
    part_names: ClassVar[tuple[str, ...]]
    """Names of the stored parts; decoding needs only these (``decode_targets`` identifies the codec by them)."""
    lossless_parts: ClassVar[tuple[str, ...]] = ()
    """Parts that round-trip exactly (tested bit for bit)."""
    exact_zero_channels: bool = True
    """An all-zero channel decodes to exactly zero (per-channel codecs; not one that shares a range across channels)."""

    @abc.abstractmethod
    def parts(self, level: LevelSpec) -> dict[str, Part]:
        """Stored arrays per row. The first part is the main one (its shape is the level's (C, H, W))."""

    @abc.abstractmethod
    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode on ``feats_SCHW.device``; returns parts with a leading row dimension."""

    @abc.abstractmethod
    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode parts (leading row dim) on their device into ``(S, C, H, W)`` of ``dtype``."""

    @abc.abstractmethod
    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """Guaranteed per-element bound on ``|decode(encode(x)) - x|`` (broadcastable to ``feats_SCHW``)."""

    def config(self) -> dict[str, Any]:
        """Codec parameters recorded in the bank attributes."""
        return {"name": self.name}


def _check_fp16_range(feats_SCHW: torch.Tensor, codec: str) -> None:
    peak = float(feats_SCHW.detach().abs().amax()) if feats_SCHW.numel() else 0.0
    if not np.isfinite(peak):
        raise BankError(f"codec {codec}: features contain NaN/Inf; the teacher pass diverged for this shard")
    if peak > FP16_MAX:
        raise BankError(
            f"codec {codec}: feature magnitude {peak:.3g} exceeds the float16 range ({FP16_MAX}); "
            "these activations cannot be stored in a float16-based codec"
        )


class Fp16Codec(Codec):
    """The reference: features rounded to float16 (relative error <= 2^-11)."""

    name = "fp16"
    part_names = ("values",)

    def parts(self, level: LevelSpec) -> dict[str, Part]:
        return {"values": Part("float16", level.shape)}

    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_fp16_range(feats_SCHW, self.name)
        return {"values": feats_SCHW.detach().to(torch.float16)}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return payload["values"].to(dtype)

    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        # round-to-nearest: half an ulp, relative 2^-11 for normals, absolute 2^-25 for subnormals
        return feats_SCHW.abs() * 2.0**-11 + 2.0**-25


class Int8Codec(Codec):
    """Per-(row, channel) affine quantisation: ``x ~= q * scale + offset`` with ``q`` int8 in [-127, 127].

    ``scale`` and ``offset`` are float16 ``(C,)`` per row. The offset is the channel's mid-range rounded to
    float16; the scale is chosen AFTER that rounding and rounded up, so the whole channel range is covered and
    the error is at most ``scale / 2`` for every element. (numcodecs' FixedScaleOffset / Quantize use one scalar
    per array; activation channels span orders of magnitude, so they do not serve.)
    """

    name = "int8"
    part_names = ("q", "scale", "offset")

    def parts(self, level: LevelSpec) -> dict[str, Part]:
        return {
            "q": Part("int8", level.shape),
            "scale": Part("float16", (level.channels,)),
            "offset": Part("float16", (level.channels,)),
        }

    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_fp16_range(feats_SCHW, self.name)
        x = feats_SCHW.detach().float()
        # 1. channel range per row: (S, C)
        lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))
        # 2. offset in float16, then the scale that covers [lo, hi] around the ROUNDED offset
        offset16 = ((lo + hi) * 0.5).to(torch.float16)
        offset = offset16.float()
        half_range = torch.maximum(hi - offset, offset - lo)
        scale = (half_range / 127.0).clamp_min(_FP16_MIN_NORMAL)
        # 3. round the scale UP to float16 (nearest of scale * (1 + 2^-10) is >= scale for normals)
        scale16 = scale.to(torch.float16)
        scale16 = torch.where(scale16.float() < scale, (scale * (1.0 + 2.0**-10)).to(torch.float16), scale16)
        # 4. quantise: (S, C, H, W) int8
        q = torch.round((x - offset[:, :, None, None]) / scale16.float()[:, :, None, None]).clamp_(-127, 127)
        return {"q": q.to(torch.int8), "scale": scale16, "offset": offset16}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = payload["scale"].float()[:, :, None, None]
        offset = payload["offset"].float()[:, :, None, None]
        return (payload["q"].float() * scale + offset).to(dtype)

    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = payload["scale"].float()[:, :, None, None].to(feats_SCHW.device)
        # half a quantisation step, plus float32 rounding of q * scale + offset
        return scale * 0.5 * (1 + 2.0**-20) + feats_SCHW.abs() * 2.0**-22


class BitRoundCodec(Codec):
    """float16 with the mantissa rounded to ``keepbits`` bits (lossy); pays only with a lossless compressor.

    Bit-identical to ``numcodecs.BitRound(keepbits)`` on float16 (pinned by a test); reimplemented in torch so
    that it runs on the device where the features are instead of forcing a GPU -> CPU copy of float16 first.
    """

    name = "bitround"
    part_names = ("values",)
    MANTISSA_BITS = 10

    def __init__(self, keepbits: int = 7) -> None:
        if not 1 <= keepbits <= self.MANTISSA_BITS:
            raise BankError(
                f"bitround keepbits={keepbits}; must be in 1..{self.MANTISSA_BITS} (float16 mantissa)"
            )
        self.keepbits = keepbits

    def parts(self, level: LevelSpec) -> dict[str, Part]:
        return {"values": Part("float16", level.shape)}

    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_fp16_range(feats_SCHW, self.name)
        x16 = feats_SCHW.detach().to(torch.float16)
        maskbits = self.MANTISSA_BITS - self.keepbits
        if maskbits == 0:
            return {"values": x16}
        # numcodecs' round-half-to-even on the unsigned bit pattern, done in int32 to avoid int16 overflow
        bits = x16.view(torch.int16).to(torch.int32) & 0xFFFF
        bits = bits + ((bits >> maskbits) & 1) + ((1 << (maskbits - 1)) - 1)
        bits = bits & ((0xFFFF >> maskbits) << maskbits)
        bits = torch.where(bits >= 0x8000, bits - 0x10000, bits)  # back to the signed int16 range
        return {"values": bits.to(torch.int16).view(torch.float16)}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return payload["values"].to(dtype)

    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        return feats_SCHW.abs() * (2.0 ** -(self.keepbits + 1) + 2.0**-11) * (1 + 2.0**-10) + 2.0**-24

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "keepbits": self.keepbits}


def _fp16_round_up(value: torch.Tensor) -> torch.Tensor:
    """``value`` (float32, >= the smallest normal) rounded UP to a float16: never below it, at most 1 ulp above."""
    rounded = value.to(torch.float16)
    return torch.where(rounded.float() < value, (value * (1.0 + 2.0**-10)).to(torch.float16), rounded)


class Int4Codec(Codec):
    """Affine 4-bit quantisation per (row, channel group), two values per byte: ``x ~= q * scale + offset``.

    The C channels are split into ``ceil(C / group)`` consecutive, near-equal groups (channel c is in group
    ``c * G // C``, so each holds at most ``group`` channels and the decoder derives the partition from C and G
    alone); each group of each row has a float16 ``scale`` and ``offset`` (the group's mid-range, rounded; the scale covering the range around the rounded offset,
    rounded up), so every element is within ``scale / 2``. ``q`` in [-7, 7] is stored as the nibble ``q + 8`` (1..15),
    low nibble = even column; the stored ``q`` has shape (C, H, ceil(W / 2)). Code 0 is never produced, so an odd
    width's padding column (all code 0) is recognised and dropped at decode without storing the width.
    """

    name = "int4"
    part_names = ("q4", "scale4", "offset4")

    def __init__(self, group: int = 8) -> None:
        if group < 1:
            raise BankError(f"int4 group size {group}; must be >= 1 channel")
        self.group = group
        self.exact_zero_channels = group == 1

    def _groups(self, channels: int) -> int:
        """How many groups C channels form (at most ``group`` channels each)."""
        return -(-channels // self.group)

    def parts(self, level: LevelSpec) -> dict[str, Part]:
        c, h, w = level.shape
        groups = self._groups(c)
        return {
            "q4": Part("uint8", (c, h, (w + 1) // 2)),
            "scale4": Part("float16", (groups,)),
            "offset4": Part("float16", (groups,)),
        }

    @staticmethod
    def _group_of(channels: int, groups: int, device: torch.device) -> torch.Tensor:
        """(C,) group index of each channel: ``c * G // C``."""
        return torch.arange(channels, device=device) * groups // channels

    def _expand(self, per_group_SG: torch.Tensor, channels: int) -> torch.Tensor:
        """(S, G) -> (S, C, 1, 1): each channel gets its group's value."""
        index = self._group_of(channels, per_group_SG.shape[1], per_group_SG.device)
        return per_group_SG[:, index, None, None]

    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_fp16_range(feats_SCHW, self.name)
        x = feats_SCHW.detach().float()
        s, c, _, w = x.shape
        # 1. range per (row, group): channel ranges, then reduced over each group's channels
        groups = self._groups(c)
        index_SC = self._group_of(c, groups, x.device).expand(s, c)
        fill = x.new_full((s, groups), float("inf"))
        lo = fill.scatter_reduce(1, index_SC, x.amin(dim=(2, 3)), "amin")
        hi = (-fill).scatter_reduce(1, index_SC, x.amax(dim=(2, 3)), "amax")
        # 2. offset in float16, then the scale covering [lo, hi] around the ROUNDED offset, rounded up
        offset16 = ((lo + hi) * 0.5).to(torch.float16)
        half_range = torch.maximum(hi - offset16.float(), offset16.float() - lo)
        scale16 = _fp16_round_up((half_range / 7.0).clamp_min(_FP16_MIN_NORMAL))
        # 3. quantise to [-7, 7], store as nibbles 1..15, two per byte along W
        q = torch.round((x - self._expand(offset16.float(), c)) / self._expand(scale16.float(), c))
        codes = (q.clamp_(-7, 7) + 8).to(torch.uint8)
        if w % 2:
            codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], dim=-1)  # code 0 marks the padding
        packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return {"q4": packed, "scale4": scale16, "offset4": offset16}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = payload["q4"]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)  # (S, C, H, 2 * W/2)
        if codes.shape[-1] and bool((codes[..., -1] == 0).all()):
            codes = codes[..., :-1]  # an odd width's padding column
        c = codes.shape[1]
        q = codes.float() - 8.0
        scale = self._expand(payload["scale4"].float(), c)
        offset = self._expand(payload["offset4"].float(), c)
        return (q * scale + offset).to(dtype)

    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = self._expand(payload["scale4"].float().to(feats_SCHW.device), feats_SCHW.shape[1])
        return scale * 0.5 * (1 + 2.0**-20) + feats_SCHW.abs() * 2.0**-22

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "group": self.group}


class Fp8Codec(Codec):
    """``float8_e4m3fn`` values with a float16 scale per (row, channel): ``x ~= fp8(x / scale) * scale``.

    The scale maps the channel's largest magnitude to at most 448 (e4m3's largest finite value) and is rounded up,
    so nothing saturates. e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, and an absolute
    ``scale * 2^-10`` in the subnormal range. The bytes are stored as uint8 (numpy has no float8 dtype).
    """

    name = "fp8"
    part_names = ("e4m3", "scale8")
    E4M3_MAX = 448.0

    def parts(self, level: LevelSpec) -> dict[str, Part]:
        return {"e4m3": Part("uint8", level.shape), "scale8": Part("float16", (level.channels,))}

    def encode(self, feats_SCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_fp16_range(feats_SCHW, self.name)
        x = feats_SCHW.detach().float()
        peak = x.abs().amax(dim=(2, 3))  # (S, C)
        scale16 = _fp16_round_up((peak / self.E4M3_MAX).clamp_min(_FP16_MIN_NORMAL))
        scaled = (x / scale16.float()[:, :, None, None]).clamp_(-self.E4M3_MAX, self.E4M3_MAX)
        return {"e4m3": scaled.to(torch.float8_e4m3fn).view(torch.uint8), "scale8": scale16}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = payload["e4m3"].view(torch.float8_e4m3fn).float()
        return (values * payload["scale8"].float()[:, :, None, None]).to(dtype)

    def error_bound(self, feats_SCHW: torch.Tensor, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = payload["scale8"].float()[:, :, None, None].to(feats_SCHW.device)
        # half an ulp: 2^-4 relative (3 mantissa bits) for normals, 2^-10 * scale absolute for subnormals,
        # plus float32 rounding of the division and the product
        return (feats_SCHW.abs() * 2.0**-4 + scale * 2.0**-10) * (1 + 2.0**-20) + feats_SCHW.abs() * 2.0**-22


CODECS: dict[str, type[Codec]] = {
    "fp16": Fp16Codec,
    "int8": Int8Codec,
    "bitround": BitRoundCodec,
    "int4": Int4Codec,
    "fp8": Fp8Codec,
}


def codec_for(name: str, settings: Any) -> Codec:
    """The codec ``name`` with the parameters of a ``BankSpec`` or ``BankConfig`` (``bitround_keepbits``,
    ``int4_group``): the one way the writer, the reader and the tools build a level's codec."""
    return make_codec(name, bitround_keepbits=settings.bitround_keepbits, int4_group=settings.int4_group)


def make_codec(name: str, *, bitround_keepbits: int = 7, int4_group: int = 8) -> Codec:
    """Codec by registry name; unknown name -> ``ValueError`` listing the valid choices."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    if name == "bitround":
        return BitRoundCodec(bitround_keepbits)
    if name == "int4":
        return Int4Codec(int4_group)
    return CODECS[name]()


@dataclass(frozen=True)
class Compressor:
    """A lossless byte compressor: the zarr codec recorded in the array metadata, and the numcodecs codecs that
    encode and decode one stored chunk (zarr's Blosc/Zstd codecs wrap these same numcodecs codecs, so the bytes
    are the same: tests/test_bank_io.py compares them)."""

    zarr_codec: Callable[[int], Any]
    """itemsize -> zarr BytesBytesCodec."""
    chunk_encoder: Callable[[int], Any]
    """itemsize -> numcodecs codec with the zarr codec's settings."""
    chunk_decoder: Callable[[], Any]


def _blosc_shuffle(itemsize: int) -> str:
    return "shuffle" if itemsize > 1 else "bitshuffle"


COMPRESSORS: dict[str, Compressor | None] = {
    "none": None,
    "blosc-lz4": Compressor(
        zarr_codec=lambda itemsize: zarr.codecs.BloscCodec(
            cname="lz4", clevel=5, shuffle=_blosc_shuffle(itemsize), typesize=itemsize
        ),
        # blocksize 0 (automatic) and the typesize argument are what zarr's BloscCodec passes (numcodecs >= 0.16)
        chunk_encoder=lambda itemsize: numcodecs.Blosc(
            cname="lz4",
            clevel=5,
            shuffle={"shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[
                _blosc_shuffle(itemsize)
            ],
            blocksize=0,
            typesize=itemsize,
        ),
        chunk_decoder=lambda: numcodecs.Blosc(),
    ),
    "zstd": Compressor(
        zarr_codec=lambda itemsize: zarr.codecs.ZstdCodec(level=3),
        chunk_encoder=lambda itemsize: numcodecs.Zstd(level=3),
        chunk_decoder=lambda: numcodecs.Zstd(),
    ),
}


def get_compressor(name: str) -> Compressor | None:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compressor {name!r}; valid compressors: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[name]
