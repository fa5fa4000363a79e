"""What a bank is: its levels, row layout and provenance (``BankSpec``), and the on-disk names of its arrays.

No torch here: ``dreamteacher bank info`` and the config loader use this module without paying for torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

FORMAT_VERSION = 3
"""Bumped on any change to the on-disk layout; readers refuse versions they do not know.

1: the first layout (side files inside the group, no per-chunk checksum). 2: every chunk ends with its crc32c
(zarr's ``crc32c`` codec) and the side files live in the sibling folder ``<bank>.side``. 3: the compact-bank
options (:attr:`BankSpec.pixels` = ``image``, mirrored flips, mean-of-K rows). A bank that uses none of them is
written as version 2 (:meth:`BankSpec.format_version`), byte for byte what version 2 writers wrote, so readers
that know only version 2 keep reading it and refuse exactly the banks they cannot read."""

SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)

PIXEL_LAYOUTS = ("rows", "image")
"""``rows``: every row stores its view's pixels (flipped rows flipped). ``image``: each image's pixels once, the
unflipped view; a flipped row's pixels are mirrored when read."""

KEY_BYTES = 64
"""Image keys are stored as fixed-width UTF-8 in a ``uint8 (rows, KEY_BYTES)`` array, NUL padded.

zarr 3.1's fixed-width bytes / string dtypes have no Zarr v3 specification yet (zarr warns
``UnstableSpecificationWarning``); ``uint8`` is in the core spec, so every Zarr v3 reader can read the keys."""

ROW_ARRAYS = ("source_index", "draw", "flip", "seed", "ok")
"""Per-row metadata arrays besides ``key`` and ``image`` (int64, except ``ok``: bool)."""


class BankError(ValueError):
    """A bank that cannot be used as asked: missing / truncated shard, unknown version, settings mismatch."""


@dataclass
class LevelSpec:
    """One teacher feature level stored in the bank."""

    name: str
    """Level name (``s<stride>``), the key shared with the student."""
    stride: int
    """Student stride this level is distilled into."""
    channels: int
    height: int
    width: int
    codec: str
    """Name in ``bank.codecs.CODECS``."""
    components: int = 0
    """k > 0: rows store k PCA coefficients per position (``bank.projection``), decoded back to ``channels`` by the
    bank's stored basis; 0: the C channels themselves. Left out of the fingerprint at 0 (older banks keep theirs)."""
    basis_sha256: str = ""
    """sha256 of the stored basis bytes (``bank.projection``) when ``components`` > 0: the fingerprint covers it."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def stored(self) -> LevelSpec:
        """The level as its codec stores it: k channels when projected."""
        if not self.components:
            return self
        return dataclasses.replace(self, channels=self.components, components=0, basis_sha256="")


@dataclass
class BankSpec:
    """Everything that defines a bank's content; its :meth:`fingerprint` identifies the bank."""

    levels: list[LevelSpec]
    num_images: int
    draws: int
    """Stochastic encodings stored per image."""
    flips: int
    """1: the image only; 2: the image and its mirror (flip index 1)."""
    shard_rows: int
    """Rows per shard: the unit of writing, resuming and fast reading. A multiple of ``draws * flips``."""
    image_size: int
    """Stored input pixels are ``(3, image_size, image_size)`` uint8."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """JSON-able provenance: teacher identity + config, encoding (mode, T, steps, seed rule), taps, preprocessing,
    dataset (name, count, keys sha256). Part of the fingerprint."""
    compressor: str = "none"
    """Lossless compressor on top of the codecs (``none``, ``blosc-lz4``, ``zstd``)."""
    bitround_keepbits: int = 7
    """Mantissa bits kept by levels whose codec is ``bitround``."""
    int4_group: int = 8
    """Channels per scale / offset group of levels whose codec is ``int4``. In the fingerprint only when a level
    uses ``int4``, so banks made before the codec existed keep theirs."""
    mean_of: int = 1
    """Each row holds the mean of this many noise draws of its view (``encode.store=mean``); 1 = a single draw.
    The mean of K draws is an unbiased, lower-variance estimate of the teacher's expected feature (the optimum of
    the MSE loss) in 1/K of the rows."""
    mirror: bool = False
    """The bank stores only the unflipped view (``flips`` = 1) and the flipped view is read as the mirror of the
    stored features and pixels (``encode.flips=mirror``): exact only for a flip-equivariant teacher
    (``dreamteacher teacher diagnose`` measures how far a teacher is from it)."""
    pixels: str = "rows"
    """Where the input pixels live: one of :data:`PIXEL_LAYOUTS`."""
    pixel_compressor: str = "none"
    """Lossless compressor of the pixels (``pixels`` = ``image`` only): ``none``, ``zstd``, ``blosc-lz4``."""
    projection_fit: dict[str, Any] = field(default_factory=dict)
    """How the projected levels' bases were fitted (``rule``, ``images``: the sample size); empty when no level
    is projected. Part of the fingerprint, with each level's ``basis_sha256``."""

    # the fields added after format version 2, left out of the fingerprint at their defaults so older banks keep
    # their fingerprints (and their bytes)
    _V3_DEFAULTS: ClassVar[dict[str, Any]] = {
        "mean_of": 1,
        "mirror": False,
        "pixels": "rows",
        "pixel_compressor": "none",
        "projection_fit": {},
    }

    def __post_init__(self) -> None:
        self.levels = [lv if isinstance(lv, LevelSpec) else LevelSpec(**lv) for lv in self.levels]
        problems = []
        if not self.levels:
            problems.append("levels is empty")
        if len({lv.name for lv in self.levels}) != len(self.levels):
            problems.append(f"level names repeat: {[lv.name for lv in self.levels]}")
        if self.flips not in (1, 2):
            problems.append(f"flips={self.flips}; must be 1 (image only) or 2 (image and mirror)")
        if self.draws < 1 or self.num_images < 0 or self.image_size < 1:
            problems.append(f"draws={self.draws}, num_images={self.num_images}, image_size={self.image_size}")
        if self.mean_of < 1 or (self.mean_of > 1 and self.draws != 1):
            problems.append(f"mean_of={self.mean_of} (>= 1; a bank of means holds one row per view, draws=1)")
        if self.mirror and self.flips != 1:
            problems.append("mirror=True stores the unflipped view only: flips must be 1")
        if self.pixels not in PIXEL_LAYOUTS:
            problems.append(f"pixels={self.pixels!r}; valid: {', '.join(PIXEL_LAYOUTS)}")
        if self.pixel_compressor != "none" and self.pixels != "image":
            problems.append("pixel_compressor applies to pixels='image' only")
        for lv in self.levels:
            if not 0 <= lv.components <= lv.channels or bool(lv.components) != bool(lv.basis_sha256):
                problems.append(
                    f"level {lv.name}: components={lv.components} (0..{lv.channels}) needs a basis_sha256 "
                    "exactly when > 0"
                )
        if any(lv.components for lv in self.levels) != bool(self.projection_fit):
            problems.append("projection_fit is recorded exactly when a level is projected (components > 0)")
        if self.shard_rows < 1 or self.shard_rows % self.views_per_image:
            problems.append(
                f"shard_rows={self.shard_rows} must be a positive multiple of draws x flips = "
                f"{self.views_per_image} so that every shard holds whole images (set bank.shard_rows)"
            )
        try:
            json.dumps(self.attributes, sort_keys=True)
        except TypeError as exc:
            problems.append(f"attributes are not JSON-able: {exc}")
        if problems:
            raise BankError("invalid BankSpec: " + "; ".join(problems))

    # ---- row layout ----------------------------------------------------------------------------------------
    @property
    def views_per_image(self) -> int:
        """Stored rows per image (a mirrored bank's flipped view is not stored)."""
        return self.draws * self.flips

    @property
    def read_flips(self) -> int:
        """Flip views a reader can serve per stored row's image: 2 when stored or mirrored."""
        return 2 if self.mirror else self.flips

    def format_version(self) -> int:
        """The oldest format that can hold this bank: 3 when it uses an option added in 3, else 2."""
        return 3 if any(getattr(self, k) != v for k, v in self._V3_DEFAULTS.items()) else 2

    @property
    def num_rows(self) -> int:
        return self.num_images * self.views_per_image

    def row_index(self, image: int, draw: int, flip: int) -> int:
        """Row of (image, draw, flip): rows of one image are contiguous, flip varies fastest."""
        return (image * self.draws + draw) * self.flips + flip

    @property
    def images_per_shard(self) -> int:
        return self.shard_rows // self.views_per_image

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_rows)

    def shard_range(self, shard: int) -> range:
        """Rows of ``shard`` (the last shard may be short)."""
        self._check_shard(shard)
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.num_rows))

    def shard_images(self, shard: int) -> range:
        """Image indices whose rows live in ``shard``."""
        self._check_shard(shard)
        per = self.images_per_shard
        return range(shard * per, min((shard + 1) * per, self.num_images))

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise BankError(f"shard {shard} out of range: the bank has {self.num_shards} shards")

    def level(self, name: str) -> LevelSpec:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise BankError(f"unknown level {name!r}; levels in the bank: {[lv.name for lv in self.levels]}")

    # ---- identity ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not any(lv.codec == "int4" for lv in self.levels):
            del data["int4_group"]
        for key, default in self._V3_DEFAULTS.items():
            if data[key] == default:
                del data[key]
        for level in data["levels"]:  # a level that is not projected keeps the dict it had before projections
            if not level["components"]:
                del level["components"], level["basis_sha256"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BankSpec:
        return cls(**data)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of everything that defines the bank's content."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    def differences(self, other: BankSpec) -> list[str]:
        """Human-readable ``key.path: this -> other`` lines for every setting that differs."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [
            f"{key}: {mine.get(key, '<absent>')!r} -> {theirs.get(key, '<absent>')!r}"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        ]


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) and "name" in x for x in data):
        out = {}
        for item in data:
            out.update(_flatten(item, f"{prefix}{item['name']}."))
        return out
    return {prefix.rstrip("."): data}


# ---- on-disk names -------------------------------------------------------------------------------------------
def feature_array_name(level: str, part: str) -> str:
    """Zarr array path of one codec part of a level, e.g. ``features/s4/q``."""
    return f"features/{level}/{part}"


def done_marker_name(shard: int) -> str:
    """Done marker of ``shard``, relative to the bank's side folder (``bank.layout.side_dir``)."""
    return f"done/{shard:06d}.json"


def claim_dir_name(shard: int) -> str:
    """Folder of ``shard``'s claim files, relative to the bank's side folder."""
    return f"claims/{shard:06d}"
