"""``bank verify``: every shard present and complete, checksums, decoded values finite and in range,
and the direct shard reader agreeing with zarr-python."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from bank.layout import (
    array_defs,
    file_checksum,
    fsync_dir,
    read_row_chunk,
    repair_hint,
    split_views,
    views_per_row,
)
from bank.reader import Bank
from bank.spec import BankError, done_marker_name

RANGE_SLACK = 1.01
"""Decoded magnitudes may exceed the float features' recorded maximum by the codec error only."""


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)
    bad_shards: set[int] = field(default_factory=set)
    """Written shards found damaged (their markers are what ``--unmark`` withdraws)."""
    checked_shards: int = 0
    notices: list[str] = field(default_factory=list)
    """Not problems: e.g. that a v1 bank has no per-chunk checksums."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bank(path: str | Path, *, progress: bool = True) -> VerifyReport:
    """Check every shard; never raises for a bad shard, reports it (and its rows) instead."""
    import warnings

    from bank.reader import NO_CHUNK_CHECKSUMS, BankFormatWarning

    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BankFormatWarning)
        bank = Bank.open(path, require_complete=False, check_rows=False)
    spec, report = bank.spec, VerifyReport()
    if not bank.chunk_checksums:
        report.notices.append(NO_CHUNK_CHECKSUMS)
    group = zarr.open_group(path, mode="r")
    defs = [d for d in array_defs(spec) if d.sharded]
    row_defs = [d for d in array_defs(spec) if not d.sharded]
    for shard in tqdm(range(spec.num_shards), desc="verify", disable=not progress):
        span = spec.shard_range(shard)
        record = bank.markers.get(shard)
        if record is None:
            report.problems.append(
                f"shard {shard}: not written (no {done_marker_name(shard)} in {bank.side})"
            )
            report.bad_rows.update(span)
            continue

        def bad(message: str, rows=span, shard=shard) -> None:
            report.problems.append(
                f"shard {shard}: {message}. {repair_hint(path, shard, bank.format_version)}"
            )
            report.bad_rows.update(rows)
            report.bad_shards.add(shard)

        # 1. checksums of every file of the shard
        bad_files = []
        for rel, check in record["files"].items():
            try:
                if file_checksum(path / rel) != check:
                    bad_files.append(rel)
            except FileNotFoundError:
                bad_files.append(rel)
        if bad_files:
            bad(f"checksum mismatch in {bad_files} (the files differ from what the writer wrote)")
            continue
        try:
            # 2. each per-row chunk's and each inner chunk's own crc32c (v2), through both readers: the direct
            #    reader agrees with zarr-python on the whole shard
            for d in row_defs:
                read_row_chunk(
                    path, d, shard, spec.shard_rows, checksum=bank.chunk_checksums, marker=record, rows=span
                )
            batch = bank.read_rows(span)
            for d in defs:
                if d.per_image:  # the first row of each image holds its stored (unflipped) pixels
                    images = spec.shard_images(shard)
                    direct = batch["image"][:: spec.views_per_image]
                    stored = group[d.path][images.start : images.stop]
                else:
                    direct = batch["image"] if d.path == "image" else batch["targets"][d.level][d.part]
                    stored = group[d.path][span.start : span.stop]
                if not np.array_equal(direct, stored):
                    bad(f"{d.path} differs between the direct reader and zarr")
            decoded = bank.decode_rows(span)
        except (BankError, ValueError) as exc:
            bad(f"unreadable: {exc}".split(" Repair:")[0].rstrip("."))
            continue
        # 3. decoded features finite and within the recorded range on OK rows
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
                    bad(f"level {level} rows {rows.tolist()} {name}", rows.tolist())
        report.checked_shards += 1
    if bank.labels_spec is not None:
        _verify_labels(bank, group, report, progress=progress)
    return report


def _verify_labels(bank: Bank, group: zarr.Group, report: VerifyReport, *, progress: bool) -> None:
    """The soft labels' shards: written, files as their markers record, chunks' crc32c, both readers agreeing,
    decoded logits finite."""
    import torch

    from bank.dataset import decode_labels
    from bank.labels import labels_side

    spec, path = bank.spec, bank.path
    per_row = views_per_row(spec)
    for shard in tqdm(range(spec.num_shards), desc="verify soft labels", disable=not progress):
        span = spec.shard_range(shard)
        record = bank.label_markers.get(shard)
        hint = repair_hint(path, shard, bank.format_version, labels=True)
        if record is None:
            report.problems.append(
                f"shard {shard}: soft labels not written (no {done_marker_name(shard)} in "
                f"{labels_side(bank.side)}); re-run `dreamteacher interpret` (it resumes)"
            )
            report.bad_rows.update(span)
            continue
        bad_files = [rel for rel, check in record["files"].items() if _checksum_or_none(path / rel) != check]
        if bad_files:
            report.problems.append(f"shard {shard}: soft labels: checksum mismatch in {bad_files}. {hint}")
            report.bad_rows.update(span)
            continue
        views = range(span.start * per_row, span.stop * per_row)
        rows, mirror = split_views(spec, np.arange(views.start, views.stop))
        try:
            batch = bank.read_rows(rows, [], mirror=mirror, labels=True)
            for part, direct in batch["labels"].items():
                if not np.array_equal(direct, group[f"labels/{part}"][views.start : views.stop]):
                    raise BankError(f"labels/{part} differs between the direct reader and zarr")
            logits = decode_labels({k: torch.from_numpy(v) for k, v in batch["labels"].items()}, "cpu")
        except (BankError, ValueError) as exc:
            report.problems.append(
                f"shard {shard}: soft labels unreadable: {exc}".split(" Repair:")[0] + f". {hint}"
            )
            report.bad_rows.update(span)
            continue
        if not torch.isfinite(logits).all():
            report.problems.append(f"shard {shard}: soft labels hold NaN/Inf. {hint}")
            report.bad_rows.update(span)


def _checksum_or_none(file: Path) -> dict[str, int] | None:
    try:
        return file_checksum(file)
    except FileNotFoundError:
        return None


def unmark_shards(path: str | Path, shards: set[int] | list[int]) -> list[Path]:
    """Withdraw the done markers of ``shards`` (damaged ones, from :func:`verify_bank`), so that the next
    ``dreamteacher encode`` with the bank's config rewrites exactly those shards. Returns the markers removed."""
    from bank.layout import read_bank_attrs, side_dir_for

    path = Path(path)
    side = side_dir_for(path, read_bank_attrs(path)["format_version"])
    removed = []
    for shard in sorted(shards):
        marker = side / done_marker_name(shard)
        if marker.exists():
            marker.unlink()
            removed.append(marker)
    if removed:
        fsync_dir(side / "done")
    return removed
