"""Writing a bank: create it whole, then each writer writes whole shards and marks each done last.

Crash safety: arrays are created at final size inside a temporary folder that is renamed into place, so a bank
either exists completely or not at all. A shard's done marker (``done/NNNNNN.json``: file sizes, crc32 of every
shard file, rejects, ranges) is written by an atomic rename AFTER all its files; a shard without a marker is
rewritten by the next run, and writing is deterministic, so ``kill -9`` at any moment + re-run gives an
identical bank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bank.codecs import get_compressor, make_codec
from bank.config import BankConfig
from bank.layout import (
    array_defs,
    check_arrays,
    create_arrays,
    write_raw_chunk,
    write_shard_file,
)
from bank.spec import (
    FORMAT_VERSION,
    KEY_BYTES,
    ROW_ARRAYS,
    SUPPORTED_FORMAT_VERSIONS,
    BankError,
    BankSpec,
    LevelSpec,
    done_marker_name,
    feature_array_name,
)

ATTRS_KEY = "dreamteacher_bank"
SUMMARY_FILE = "summary.json"


@dataclass
class ShardRows:
    """Everything encode hands the writer for one whole shard of ``S`` rows (in row order)."""

    images_u8: np.ndarray
    """(S, 3, H, W) uint8: the exact preprocessed pixels the teacher saw (flipped rows flipped)."""
    features: dict[str, torch.Tensor | np.ndarray]
    """level -> (S, C, h, w) float on any device; codecs run where the tensor is."""
    keys: list[str]
    source_index: np.ndarray
    draw: np.ndarray
    flip: np.ndarray
    seed: np.ndarray
    ok: np.ndarray
    """(S,) bool; rows of a rejected image are False and hold zeros."""
    rejects: dict[str, str] = dataclasses.field(default_factory=dict)
    """image key -> reason."""


def spec_from_config(
    levels: list[dict[str, Any]],
    cfg: BankConfig,
    *,
    num_images: int,
    draws: int,
    flips: int,
    image_size: int,
    attributes: dict[str, Any],
) -> BankSpec:
    """A :class:`BankSpec` whose shard size, codecs and compressor come from ``cfg``.

    ``levels``: dicts with name, stride, channels, height, width (e.g. ``TapInfo.as_dict()``; extra keys ignored).
    """
    level_specs = [
        LevelSpec(
            name=lv["name"],
            stride=int(lv["stride"]),
            channels=int(lv["channels"]),
            height=int(lv["height"]),
            width=int(lv["width"]),
            codec=cfg.level_codecs.get(lv["name"], cfg.codec),
        )
        for lv in levels
    ]
    unknown = sorted(set(cfg.level_codecs) - {lv.name for lv in level_specs})
    if unknown:
        raise BankError(
            f"bank.level_codecs names unknown levels {unknown}; levels: {[lv.name for lv in level_specs]}"
        )
    return BankSpec(
        levels=level_specs,
        num_images=num_images,
        draws=draws,
        flips=flips,
        shard_rows=cfg.shard_rows,
        image_size=image_size,
        attributes=attributes,
        compressor=cfg.compressor,
        bitround_keepbits=cfg.bitround_keepbits,
    )


def library_versions() -> dict[str, str]:
    import numcodecs

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "torch": torch.__version__,
    }


def read_bank_attrs(path: Path) -> dict[str, Any]:
    """The bank's own attributes from its group, with the format version checked."""
    try:
        group = zarr.open_group(path, mode="r")
    except FileNotFoundError as exc:
        raise BankError(f"no bank at {path} (no zarr.json); run `dreamteacher encode` to create it") from exc
    attrs = dict(group.attrs)
    if ATTRS_KEY not in attrs:
        raise BankError(f"{path} is a Zarr group but not a DreamTeacher bank (no {ATTRS_KEY!r} attribute)")
    meta = attrs[ATTRS_KEY]
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise BankError(
            f"{path} has bank format version {meta.get('format_version')!r}; this code reads versions "
            f"{SUPPORTED_FORMAT_VERSIONS}. Use the matching release of this project or re-encode."
        )
    return meta


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _absmax_of_rows(feats_SCHW: torch.Tensor, ok: np.ndarray) -> float:
    """max |x| over the rows where ``ok`` (0.0 when none): one min/max pass, no |x| temporary, no row copy when
    every row is OK (profiled: ``x[ok].abs().amax()`` was a quarter of an ADM-256 shard's write on CPU)."""
    if not ok.any():
        return 0.0
    sel = feats_SCHW if ok.all() else feats_SCHW[torch.from_numpy(ok).to(feats_SCHW.device)]
    lo, hi = torch.aminmax(sel)
    return max(-float(lo), float(hi))


class BankWriter:
    """Writes whole shards of a bank created at final size (:meth:`create`)."""

    def __init__(self, path: Path, spec: BankSpec) -> None:
        self.path, self.spec = Path(path), spec
        self.group = zarr.open_group(self.path, mode="r+")
        self.arrays = {adef.path: adef for adef in array_defs(spec)}
        compressor = get_compressor(spec.compressor)
        self._chunk_encoders = {
            adef.path: compressor.chunk_encoder(np.dtype(adef.dtype).itemsize)
            for adef in self.arrays.values()
            if compressor and adef.sharded
        }
        self.codecs = {
            lv.name: make_codec(lv.codec, bitround_keepbits=spec.bitround_keepbits) for lv in spec.levels
        }

    # ---- creation / resume ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, spec: BankSpec, cfg: BankConfig, *, overwrite: bool = False
    ) -> BankWriter:
        """New bank (all arrays at final size), or the existing one with the same fingerprint, opened to resume."""
        path = Path(path)
        _check_spec_matches_config(spec, cfg)
        if (path / "zarr.json").exists():
            existing = BankSpec.from_dict(read_bank_attrs(path)["spec"])
            if existing.fingerprint() == spec.fingerprint():
                writer = cls(path, spec)
                check_arrays(writer.group, spec)
                return writer
            if not overwrite:
                raise BankError(
                    f"a different bank already exists at {path}; differing settings (existing -> new):\n  "
                    + "\n  ".join(existing.differences(spec))
                    + "\nPass --overwrite (encode.overwrite=true) to replace it, or choose another bank path."
                )
            shutil.rmtree(path)
        elif path.exists() and any(path.iterdir()):
            if not overwrite:
                raise BankError(f"{path} exists and is not a bank; remove it or pass --overwrite")
            shutil.rmtree(path)
        # 1. build the whole empty bank in a temporary folder, 2. rename it into place (atomic on one filesystem)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        attrs = {
            "format_version": FORMAT_VERSION,
            "spec": spec.to_dict(),
            "fingerprint": spec.fingerprint(),
            "codecs": {
                lv.name: make_codec(lv.codec, bitround_keepbits=spec.bitround_keepbits).config()
                for lv in spec.levels
            },
            "library_versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        group = zarr.open_group(tmp, mode="w", attributes={ATTRS_KEY: attrs})
        create_arrays(group, spec)
        (tmp / "done").mkdir()
        if path.exists():
            path.rmdir()  # an empty folder left by the caller
        os.replace(tmp, path)
        return cls(path, spec)

    # ---- progress ------------------------------------------------------------------------------------------
    def is_done(self, shard: int) -> bool:
        self.spec.shard_range(shard)  # range check
        return (self.path / done_marker_name(shard)).exists()

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.spec.num_shards) if not self.is_done(i)]

    # ---- writing -------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, rows: ShardRows) -> dict[str, Any]:
        """Write all of ``shard``'s rows, then its done marker (last, atomically). Idempotent."""
        start_time = time.perf_counter()
        span = self.spec.shard_range(shard)
        self._check_rows(shard, span, rows)
        # 1. a rewrite first withdraws the marker, so a crash mid-rewrite leaves the shard pending
        marker = self.path / done_marker_name(shard)
        marker.unlink(missing_ok=True)
        # 2. features (codecs run on the tensors' device), pixels, per-row metadata: whole-shard writes, each
        #    returning the checksum of the bytes it wrote
        absmax, files = self._write_arrays(shard, rows)
        # 3. the marker (last, atomic)
        record = {
            "shard": shard,
            "rows": [span.start, span.stop],
            "num_ok": int(np.count_nonzero(rows.ok)),
            "rejects": dict(sorted(rows.rejects.items())),
            "absmax": absmax,
            "files": files,
            "fingerprint": self.spec.fingerprint(),
        }
        _atomic_write_json(marker, record)
        nbytes = sum(f["nbytes"] for f in files.values())
        return {
            "shard": shard,
            "rows": len(span),
            "num_ok": record["num_ok"],
            "rejects": len(rows.rejects),
            "bytes": nbytes,
            "seconds": time.perf_counter() - start_time,
        }

    def _write_arrays(
        self, shard: int, rows: ShardRows
    ) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
        """Write every array's file of ``shard``; returns each level's max |feature| over OK rows (for verify) and
        each file's checksum by its path inside the bank."""
        absmax: dict[str, float] = {}
        files: dict[str, dict[str, int]] = {}
        for level in self.spec.levels:
            feats_SCHW = rows.features[level.name]
            if isinstance(feats_SCHW, np.ndarray):
                feats_SCHW = torch.from_numpy(feats_SCHW)
            absmax[level.name] = _absmax_of_rows(feats_SCHW, np.asarray(rows.ok, dtype=bool))
            for part, values in self.codecs[level.name].encode(feats_SCHW).items():
                files |= self._write_sharded(
                    shard, feature_array_name(level.name, part), values.cpu().numpy()
                )
        files |= self._write_sharded(shard, "image", rows.images_u8)
        # the per-row arrays: one uncompressed chunk per shard
        per_row = {"key": encode_keys(rows.keys)} | {name: getattr(rows, name) for name in ROW_ARRAYS}
        for name, values in per_row.items():
            adef = self.arrays[name]
            file = adef.shard_file(self.path, shard)
            files[str(file.relative_to(self.path))] = write_raw_chunk(
                file, values, adef.dtype, self.spec.shard_rows
            )
        return absmax, files

    def _write_sharded(self, shard: int, name: str, values: np.ndarray) -> dict[str, dict[str, int]]:
        """One shard file of a sharded array (each row one inner chunk, compressed when the bank is); returns
        ``{path inside the bank: checksum}``."""
        adef = self.arrays[name]
        little = np.ascontiguousarray(values, dtype=np.dtype(adef.dtype).newbyteorder("<"))
        rows_bytes = little.reshape(len(little), -1).view(np.uint8)
        encoder = self._chunk_encoders.get(name)
        if encoder is None:
            chunks, nbytes = rows_bytes, np.full(len(rows_bytes), adef.row_nbytes)
        else:  # each row as its dtype: blosc's shuffle needs the item size
            encoded = [encoder.encode(row) for row in little]
            chunks, nbytes = b"".join(encoded), np.array([len(e) for e in encoded])
        file = adef.shard_file(self.path, shard)
        return {
            str(file.relative_to(self.path)): write_shard_file(file, chunks, nbytes, self.spec.shard_rows)
        }

    def _check_rows(self, shard: int, span: range, rows: ShardRows) -> None:
        n, spec, problems = len(span), self.spec, []
        size = spec.image_size
        if rows.images_u8.dtype != np.uint8 or rows.images_u8.shape != (n, 3, size, size):
            problems.append(
                f"images_u8 is {rows.images_u8.dtype}{rows.images_u8.shape}, expected uint8{(n, 3, size, size)}"
            )
        if set(rows.features) != {lv.name for lv in spec.levels}:
            problems.append(
                f"features has levels {sorted(rows.features)}, expected {[lv.name for lv in spec.levels]}"
            )
        for level in spec.levels:
            feats = rows.features.get(level.name)
            if feats is not None and tuple(feats.shape) != (n, *level.shape):
                problems.append(
                    f"features[{level.name}] is {tuple(feats.shape)}, expected {(n, *level.shape)}"
                )
        for name in ROW_ARRAYS:
            if np.shape(getattr(rows, name)) != (n,):
                problems.append(f"{name} has shape {np.shape(getattr(rows, name))}, expected ({n},)")
        if len(rows.keys) != n:
            problems.append(f"{len(rows.keys)} keys for {n} rows")
        if not problems:
            row = np.arange(span.start, span.stop)
            if not np.array_equal(rows.draw, (row // spec.flips) % spec.draws) or not np.array_equal(
                rows.flip, row % spec.flips
            ):
                problems.append(
                    "draw/flip do not follow the row layout row = (image * draws + draw) * flips + flip"
                )
        if problems:
            raise BankError(f"shard {shard} rows {span.start}..{span.stop - 1}: " + "; ".join(problems))

    def finalize(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` (caller's timings etc. plus rows, rejects and bytes from the markers)."""
        pending = self.pending_shards()
        if pending:
            raise BankError(
                f"cannot finalize {self.path}: {len(pending)} shard(s) not written: {pending[:20]}"
            )
        rejects: dict[str, str] = {}
        total_bytes, num_ok = 0, 0
        for shard in range(self.spec.num_shards):
            record = json.loads((self.path / done_marker_name(shard)).read_text())
            rejects.update(record["rejects"])
            total_bytes += sum(f["nbytes"] for f in record["files"].values())
            num_ok += record["num_ok"]
        data = {
            **summary,
            "rows": self.spec.num_rows,
            "rows_ok": num_ok,
            "rejects": rejects,
            "bytes": total_bytes,
            "fingerprint": self.spec.fingerprint(),
        }
        _atomic_write_json(self.path / SUMMARY_FILE, data)


def encode_keys(keys: list[str]) -> np.ndarray:
    """Keys -> ``(n, KEY_BYTES)`` uint8, UTF-8, NUL padded. Too-long keys are an error, not truncated."""
    out = np.zeros((len(keys), KEY_BYTES), dtype=np.uint8)
    for i, key in enumerate(keys):
        raw = key.encode("utf-8")
        if len(raw) > KEY_BYTES or b"\0" in raw:
            raise BankError(f"image key {key!r} is longer than {KEY_BYTES} UTF-8 bytes or contains NUL")
        out[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode_keys(keys_u8: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in keys_u8]


def _check_spec_matches_config(spec: BankSpec, cfg: BankConfig) -> None:
    expected = {
        "shard_rows": cfg.shard_rows,
        "compressor": cfg.compressor,
        "bitround_keepbits": cfg.bitround_keepbits,
        **{f"levels.{lv.name}.codec": cfg.level_codecs.get(lv.name, cfg.codec) for lv in spec.levels},
    }
    actual = {
        "shard_rows": spec.shard_rows,
        "compressor": spec.compressor,
        "bitround_keepbits": spec.bitround_keepbits,
        **{f"levels.{lv.name}.codec": lv.codec for lv in spec.levels},
    }
    diff = [
        f"{k}: spec {actual[k]!r}, bank config {expected[k]!r}" for k in expected if expected[k] != actual[k]
    ]
    if diff:
        raise BankError(
            "the BankSpec disagrees with the bank config (build it with bank.spec_from_config):\n  "
            + "\n  ".join(diff)
        )
