"""Bank layout and codec choices (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

CodecName = Literal["fp16", "int8", "bitround", "int4", "fp8"]
ChunkCheck = Literal["always", "first", "never"]
"""When a reader checks a stored chunk's crc32c (format v2): ``always`` on every read; ``first`` the first time
this process reads the chunk (its later reads trust the bytes checked then: the check is a second pass over every
byte, the reader's largest cost after the copy itself, docs/benchmarks.md); ``never``."""
CHUNK_CHECKS: tuple[str, ...] = get_args(ChunkCheck)


@dataclass(kw_only=True)
class BankConfig:
    """How encode lays out a new bank. Fixed at creation; recorded in the bank's attributes."""

    shard_rows: int = 64
    """Rows per shard (the unit of writing and of resumption). Must be a multiple of draws x flip views."""
    codec: CodecName = "int8"
    """Default feature codec for every level."""
    level_codecs: dict[str, CodecName] = field(default_factory=dict)
    """Per-level overrides, keyed by level name (e.g. ``s4: fp16``)."""
    compressor: Literal["none", "blosc-lz4", "zstd"] = "none"
    """Lossless compressor on top of the codec (it gains little on float activations: docs/benchmarks.md,
    Codecs per level; so off by default)."""
    bitround_keepbits: int = 7
    """Mantissa bits kept by the ``bitround`` codec."""
    int4_group: int = 8
    """Channels sharing one scale / offset in the ``int4`` codec (at most; near-equal consecutive groups)."""
    pixels: Literal["rows", "image"] = "rows"
    """rows: every row stores its view's input pixels. image: each image's pixels once (the unflipped view; a
    flipped row's are mirrored when read): at the default 2 draws x 2 flips, 1/4 of the pixel bytes."""
    pixel_compressor: Literal["none", "zstd", "blosc-lz4"] = "none"
    """Lossless compressor of the pixels once per image (``pixels: image``); docs/encode.md has the ratios."""
    projection: dict[str, int] = field(default_factory=dict)
    """Per level, k PCA components stored per position instead of the C channels (``s4: 256``; 0 or absent = the
    channels). The basis is fitted on ``projection_images`` images before the first shard is written, stored in
    the bank and covered by its fingerprint (docs/bank-format.md, Projection)."""
    projection_energy: dict[str, float] = field(default_factory=dict)
    """Per level, the fraction of the fit sample's channel variance to keep instead of a fixed k (``s4: 0.99``;
    scikit-learn PCA's float ``n_components``): k = the fewest components that keep at least it, chosen by the
    fit and recorded in the spec (``bank info`` prints it). A level is in at most one of ``projection`` and
    ``projection_energy``."""
    projection_budget: float = 0.0
    """Instead of k per level: the fraction of a row's feature values its coefficients may take, over every level
    (``0.4``: 40 %; with ``int4``, 40 % of the int4 bytes). The fit chooses the k of every level to keep the most
    variance within that budget (:func:`bank.projection.allocate_budget`; a level whose k reaches C stores its
    channels). 0 = off. Excludes ``projection`` and ``projection_energy``."""
    projection_images: int = 256
    """Images in the projection fit's sample (evenly spaced over the key-sorted dataset; draw 0, every stored
    flip view)."""

    def __post_init__(self) -> None:
        problems = []
        if self.int4_group < 1:
            problems.append(f"int4_group={self.int4_group}: a group holds at least one channel")
        negative = {level: k for level, k in self.projection.items() if k < 0}
        if negative:
            problems.append(f"projection={negative}: k is a number of components, >= 0 (0 = no projection)")
        bad_energy = {level: e for level, e in self.projection_energy.items() if not 0 < e <= 1}
        if bad_energy:
            problems.append(f"projection_energy={bad_energy}: a fraction of the variance, in (0, 1]")
        both = sorted(
            level for level, k in self.projection.items() if k > 0 and level in self.projection_energy
        )
        if both:
            problems.append(
                f"levels {both} are in both projection and projection_energy: choose k or the energy"
            )
        if not 0 <= self.projection_budget < 1:
            problems.append(
                f"projection_budget={self.projection_budget}: a fraction of the feature values in [0, 1) (0 = off)"
            )
        if self.projection_budget and (any(self.projection.values()) or self.projection_energy):
            problems.append(
                f"projection_budget={self.projection_budget} chooses every level's k: set bank.projection_budget=0 "
                "to give projection / projection_energy per level, or leave those empty"
            )
        if self.projection_images < 1:
            problems.append(f"projection_images={self.projection_images}: the fit needs at least one image")
        if self.pixel_compressor != "none" and self.pixels != "image":
            problems.append(
                f"pixel_compressor={self.pixel_compressor} compresses pixels stored once per image: set "
                "bank.pixels=image (or pixel_compressor=none)"
            )
        if problems:
            raise ValueError("\n".join(problems))
