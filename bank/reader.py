"""Reading a bank: validated at open time, rows copied straight out of the shard files (see ``bank.layout``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bank.codecs import make_codec
from bank.layout import ArrayDef, ShardFileCache, array_defs, check_arrays
from bank.spec import BankError, BankSpec, LevelSpec, done_marker_name
from bank.writer import SUMMARY_FILE, decode_keys, read_bank_attrs


class Bank:
    """A bank opened for reading. Open with :meth:`open`; every check happens there, not mid-epoch."""

    def __init__(self, path: Path, attrs: dict[str, Any], spec: BankSpec, markers: dict[int, dict[str, Any]]):
        self.path, self.attrs, self.spec = path, attrs, spec
        self.levels: list[LevelSpec] = spec.levels
        self.fingerprint: str = attrs["fingerprint"]
        self.markers = markers
        self.rejects: dict[str, str] = {}
        for record in markers.values():
            self.rejects.update(record["rejects"])
        self.codecs = {
            lv.name: make_codec(lv.codec, bitround_keepbits=spec.bitround_keepbits) for lv in self.levels
        }
        self._defs = array_defs(spec)
        group = zarr.open_group(path, mode="r")
        # small per-row metadata, read whole once (not the hot path)
        self.row_meta = {name: group[name][:] for name in ("source_index", "draw", "flip", "seed", "ok")}
        self._group = group
        self._files = ShardFileCache(path, spec)

    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> Bank:
        """Open and validate: format version, fingerprint, arrays, done markers, shard file sizes."""
        path = Path(path)
        # 1. attributes: version and fingerprint
        attrs = read_bank_attrs(path)
        spec = BankSpec.from_dict(attrs["spec"])
        if spec.fingerprint() != attrs["fingerprint"]:
            raise BankError(
                f"{path}: the recorded fingerprint does not match the recorded spec (the attributes were edited); "
                "re-encode the bank"
            )
        # 2. arrays: names, shapes, dtypes, shard layout
        check_arrays(zarr.open_group(path, mode="r"), spec)
        # 3. done markers and the files they vouch for
        markers: dict[int, dict[str, Any]] = {}
        missing_markers = []
        for shard in range(spec.num_shards):
            marker = path / done_marker_name(shard)
            if not marker.exists():
                missing_markers.append(shard)
                continue
            record = json.loads(marker.read_text())
            if record.get("fingerprint") != spec.fingerprint():
                raise BankError(
                    f"{marker} belongs to a different bank (fingerprint mismatch); delete it and re-encode"
                )
            for rel, check in record["files"].items():
                file = path / rel
                size = file.stat().st_size if file.exists() else None
                if size != check["nbytes"]:
                    state = (
                        "missing"
                        if size is None
                        else f"truncated/changed ({size} bytes, marker says {check['nbytes']})"
                    )
                    raise BankError(
                        f"{path}: shard {shard} file {rel} is {state}. Delete {marker.relative_to(path)} and re-run "
                        "encode to rewrite the shard"
                    )
            markers[shard] = record
        if require_complete and missing_markers:
            raise BankError(
                f"{path} is incomplete: {len(missing_markers)} of {spec.num_shards} shards not written "
                f"(first: {missing_markers[:10]}). Re-run encode to finish it (it resumes), or open with "
                "require_complete=False"
            )
        return cls(path, attrs, spec, markers)

    # ---- properties ----------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.spec.num_rows

    @property
    def ok(self) -> np.ndarray:
        """(num_rows,) bool."""
        return self.row_meta["ok"]

    @property
    def image_ok(self) -> np.ndarray:
        """(num_images,) bool: every row of the image is OK and its shard is written."""
        views = self.ok.reshape(self.spec.num_images, self.spec.views_per_image).all(axis=1)
        for shard in range(self.spec.num_shards):
            if shard not in self.markers:
                views[self.spec.shard_images(shard).start : self.spec.shard_images(shard).stop] = False
        return views

    def summary(self) -> dict[str, Any] | None:
        file = self.path / SUMMARY_FILE
        return json.loads(file.read_text()) if file.exists() else None

    def keys(self, rows: Sequence[int] | slice) -> list[str]:
        return decode_keys(np.asarray(self._group["key"][_as_index_array(rows, self.num_rows)]))

    def array_defs(self, levels: list[str] | None = None) -> list[ArrayDef]:
        """Sharded arrays needed for ``levels`` (all levels when None), image first."""
        names = set(levels) if levels is not None else {lv.name for lv in self.levels}
        for name in names:
            self.spec.level(name)  # unknown level -> BankError
        return [d for d in self._defs if d.sharded and (d.path == "image" or d.level in names)]

    # ---- the hot path --------------------------------------------------------------------------------------
    def read_rows(self, rows: Sequence[int] | slice, levels: list[str] | None = None) -> dict[str, Any]:
        """Rows as numpy: ``image`` uint8 (n, 3, H, W), ``targets`` {level: {part: encoded array}} (NOT decoded),
        ``row``, ``source_index``, ``draw``, ``flip``, ``seed``, ``ok`` (n,)."""
        index = _as_index_array(rows, self.num_rows)
        n = len(index)
        shard_of = index // self.spec.shard_rows
        out: dict[str, Any] = {"targets": {}}
        defs = self.array_defs(levels)
        buffers = {d.path: np.empty((n, *d.row_shape), dtype=d.dtype) for d in defs}
        # group rows by shard: one index lookup per (array, shard), rows copied in request order
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, bounds) if n else []:
            shard = int(shard_of[group[0]])
            if shard not in self.markers:
                raise BankError(f"{self.path}: rows of shard {shard} requested but the shard is not written")
            local = index[group] - shard * self.spec.shard_rows
            for d in defs:
                if len(group) == n:  # the common case (whole batch from one shard): no scatter needed
                    self._files.get(d, shard).read_into(local, buffers[d.path])
                else:
                    tmp = np.empty((len(group), *d.row_shape), dtype=d.dtype)
                    self._files.get(d, shard).read_into(local, tmp)
                    buffers[d.path][group] = tmp
        for d in defs:
            if d.path == "image":
                out["image"] = buffers[d.path]
            else:
                out["targets"].setdefault(d.level, {})[d.part] = buffers[d.path]
        out["row"] = index
        for name, values in self.row_meta.items():
            out[name] = values[index]
        return out

    def decode_rows(
        self, rows: Sequence[int] | slice, levels: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Convenience (tools, tests): rows decoded to float32 numpy on the CPU."""
        import torch

        batch = self.read_rows(rows, levels)
        return {
            level: self.codecs[level].decode({k: torch.from_numpy(v) for k, v in parts.items()}).numpy()
            for level, parts in batch["targets"].items()
        }


def _as_index_array(rows: Sequence[int] | slice, num_rows: int) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(num_rows, dtype=np.int64)[rows]
    index = np.asarray(rows, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= num_rows):
        raise BankError(
            f"row index out of range 0..{num_rows - 1}: {index[(index < 0) | (index >= num_rows)][:5]}"
        )
    return index
