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


CODECS: dict[str, type[Codec]] = {"fp16": Fp16Codec, "int8": Int8Codec, "bitround": BitRoundCodec}


def make_codec(name: str, *, bitround_keepbits: int = 7) -> Codec:
    """Codec by registry name; unknown name -> ``ValueError`` listing the valid choices."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(CODECS)}")
    if name == "bitround":
        return BitRoundCodec(bitround_keepbits)
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
