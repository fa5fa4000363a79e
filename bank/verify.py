"""``bank verify``: every shard present and complete, checksums, decoded values finite and in range,
and the direct shard reader agreeing with zarr-python."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from bank.layout import array_defs, file_checksum
from bank.reader import Bank
from bank.spec import done_marker_name

RANGE_SLACK = 1.01
"""Decoded magnitudes may exceed the float features' recorded maximum by the codec error only."""


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)
    checked_shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bank(path: str | Path, *, progress: bool = True) -> VerifyReport:
    """Check every shard; never raises for a bad shard, reports it (and its rows) instead."""
    path = Path(path)
    bank = Bank.open(path, require_complete=False)
    spec, report = bank.spec, VerifyReport()
    group = zarr.open_group(path, mode="r")
    defs = [d for d in array_defs(spec) if d.sharded]
    for shard in tqdm(range(spec.num_shards), desc="verify", disable=not progress):
        span = spec.shard_range(shard)
        marker = path / done_marker_name(shard)
        if not marker.exists():
            report.problems.append(f"shard {shard}: not written (no {marker.name})")
            report.bad_rows.update(span)
            continue
        record = json.loads(marker.read_text())
        # 1. checksums of every file of the shard
        bad_files = [rel for rel, c in record["files"].items() if file_checksum(path / rel) != c]
        if bad_files:
            report.problems.append(f"shard {shard}: checksum mismatch in {bad_files}")
            report.bad_rows.update(span)
            continue
        # 2. the direct reader agrees with zarr-python on the whole shard
        batch = bank.read_rows(span)
        for d in defs:
            direct = batch["image"] if d.path == "image" else batch["targets"][d.level][d.part]
            if not np.array_equal(direct, group[d.path][span.start : span.stop]):
                report.problems.append(f"shard {shard}: {d.path} differs between the direct reader and zarr")
                report.bad_rows.update(span)
        # 3. decoded features finite and within the recorded range on OK rows
        decoded = bank.decode_rows(span)
        ok = batch["ok"]
        for level, values in decoded.items():
            flat = values.reshape(len(span), -1)
            nonfinite = ~np.isfinite(flat).all(axis=1)
            limit = record["absmax"][level] * RANGE_SLACK + 1e-3
            out_of_range = np.abs(np.nan_to_num(flat, nan=0.0, posinf=np.inf)).max(axis=1) > limit
            dead = ok & (np.abs(flat).max(axis=1) == 0)
            for name, mask in (
                ("NaN/Inf", nonfinite),
                (f"|x| > {limit:.4g}", out_of_range),
                ("all zero", dead),
            ):
                rows = np.asarray(span)[mask & ok if name != "NaN/Inf" else mask]
                if rows.size:
                    report.problems.append(f"shard {shard}: level {level} rows {rows.tolist()} {name}")
                    report.bad_rows.update(rows.tolist())
        report.checked_shards += 1
    return report
