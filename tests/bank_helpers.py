"""Tiny real banks for the bank tests: activation-like features (channel scales spanning decades)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bank.config import BankConfig
from bank.spec import BankSpec
from bank.writer import BankWriter, ShardRows, spec_from_config

LEVELS = [
    {"name": "s8", "stride": 8, "channels": 6, "height": 4, "width": 4},
    {"name": "s4", "stride": 4, "channels": 4, "height": 8, "width": 8},
]


def activation_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(S, C, H, W) float32 with per-channel scales from 1e-2 to 1e2 and offsets (like UNet activations)."""
    g = torch.Generator().manual_seed(seed)
    s, c = shape[0], shape[1]
    scale = 10.0 ** torch.linspace(-2, 2, c)[None, :, None, None]
    offset = torch.randn(s, c, 1, 1, generator=g) * scale
    return torch.randn(shape, generator=g) * scale + offset


def make_spec(
    cfg: BankConfig,
    num_images: int = 5,
    draws: int = 2,
    flips: int = 2,
    *,
    mirror: bool = False,
    image_size: int = 16,
) -> BankSpec:
    return spec_from_config(
        LEVELS,
        cfg,
        num_images=num_images,
        draws=draws,
        flips=flips,
        image_size=image_size,
        attributes={"teacher": {"kind": "test"}, "encoding": {"mode": "noise", "t": 50}},
        mirror=mirror,
    )


def shard_rows(spec: BankSpec, shard: int, rejected_images: tuple[int, ...] = ()) -> ShardRows:
    """Deterministic rows of ``shard`` (a function of the shard index only)."""
    span = spec.shard_range(shard)
    rows = np.arange(span.start, span.stop)
    n, image = len(rows), rows // spec.views_per_image
    rng = np.random.default_rng(shard)
    ok = ~np.isin(image, rejected_images)
    feats = {}
    for i, lv in enumerate(spec.levels):
        f = activation_like((n, *lv.shape), seed=1000 * shard + i)
        f[torch.from_numpy(~ok)] = 0
        feats[lv.name] = f
    return ShardRows(
        images_u8=rng.integers(0, 256, (n, 3, spec.image_size, spec.image_size), dtype=np.uint8),
        features=feats,
        keys=[f"img/{x:04d}.png" for x in image],
        source_index=image + 100,
        draw=(rows // spec.flips) % spec.draws,
        flip=rows % spec.flips,
        seed=rows * 7,
        ok=ok,
        rejects={f"img/{x:04d}.png": "unreadable" for x in sorted(set(image[~ok]))},
    )


def write_bank(
    path: Path, cfg: BankConfig | None = None, *, format_version: int | None = None, **spec_kw
) -> BankSpec:
    """A complete bank; ``format_version=1`` writes the old layout (no per-chunk checksums, side files in the
    group), the fixture for "old banks still open"."""
    cfg = cfg or BankConfig(shard_rows=8, codec="int8", level_codecs={"s8": "fp16"})
    spec = make_spec(cfg, **spec_kw)
    writer = BankWriter.create(path, spec, cfg, format_version=format_version)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_rows(spec, shard))
    writer.finalize({"seconds": 0.0})
    return spec
