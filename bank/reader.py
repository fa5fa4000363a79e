"""Reading a bank: validated at open time, rows copied straight out of the shard files (see ``bank.layout``)."""

from __future__ import annotations

import json
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bank.codecs import codec_for
from bank.config import CHUNK_CHECKS, ChunkCheck
from bank.labels import LabelsSpec, label_array_defs, read_label_marker, read_labels_attrs
from bank.layout import (
    SUMMARY_FILE,
    ArrayDef,
    ShardFileCache,
    array_defs,
    check_arrays,
    decode_keys,
    has_chunk_checksums,
    read_bank_attrs,
    read_marker,
    read_row_chunk,
    repair_hint,
    side_dir_for,
)
from bank.projection import Projection, read_projections
from bank.spec import ROW_ARRAYS, BankError, BankSpec, LevelSpec

_ALIGN = 64  # bytes: every array of a batch buffer starts cache-line aligned (any dtype's alignment)
_FREE_REFS = (
    2  # sys.getrefcount of a pooled buffer only the pool's list holds: the list + the call's argument
)
NO_CHUNK_CHECKSUMS = (
    "bank format v1: its feature and pixel chunks carry no per-chunk checksum, so a flipped byte in them is "
    "found only by `dreamteacher bank verify` (per-row arrays and file sizes are checked at open); re-encode "
    "to get format v2"
)


class BankFormatWarning(UserWarning):
    """A bank that opens but lacks a safety feature of the current format (e.g. a v1 bank's chunk checksums)."""


class Bank:
    """A bank opened for reading. Open with :meth:`open`; every check that is cheap happens there, and each
    feature or pixel chunk's crc32c is checked as it is read (format v2; ``verify_chunks`` says when)."""

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        spec: BankSpec,
        markers: dict[int, dict[str, Any]],
        row_meta: dict[str, np.ndarray],
        *,
        verify_chunks: ChunkCheck = "always",
        labels: tuple[LabelsSpec, dict[int, dict[str, Any]]] | None = None,
    ):
        self.path, self.attrs, self.spec = path, attrs, spec
        self.format_version: int = attrs["format_version"]
        self.bank_id: str | None = attrs.get("bank_id")
        self.side = side_dir_for(path, self.format_version)
        self.chunk_checksums = has_chunk_checksums(self.format_version)
        """Whether the bank's chunks carry a crc32c (format v2), checked as ``verify_chunks`` says."""
        self.verify_chunks: ChunkCheck = verify_chunks if self.chunk_checksums else "never"
        self.levels: list[LevelSpec] = spec.levels
        self.fingerprint: str = attrs["fingerprint"]
        self.markers = markers
        self.rejects: dict[str, str] = {}
        for record in markers.values():
            self.rejects.update(record["rejects"])
        self.codecs = {lv.name: codec_for(lv.codec, spec) for lv in self.levels}
        self.projections: dict[str, Projection] = read_projections(path, self.levels)
        """Bases of the projected levels (``bank.projection``; checked against the spec's sha256 at open): the
        decoded coefficients of such a level go through ``projections[level].unproject`` (``decode_targets``)."""
        self._defs = array_defs(spec)
        self.labels_spec, self.label_markers = labels if labels is not None else (None, {})
        """The soft labels the bank declares (``bank.labels``; complete or not) and the done markers of their
        shards; :attr:`labels` is the spec only once every shard is written."""
        self._label_defs = label_array_defs(self.labels_spec, spec) if self.labels_spec is not None else []
        self.row_meta = row_meta
        """Small per-row metadata (source_index, draw, flip, seed, ok), read whole and checked at open; rows
        of shards not written are zero (ok=False)."""
        self._group: zarr.Group | None = None
        self._files = ShardFileCache(
            path,
            spec,
            checksum=self.chunk_checksums,
            check=self.verify_chunks,
            extra_arrays=len(self._label_defs),
        )
        self._buffers = BufferPool()
        self._layouts: dict[tuple[Any, bool], tuple[list[ArrayDef], list[int], int]] = {}

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        require_complete: bool = True,
        verify_chunks: ChunkCheck = "always",
        check_rows: bool = True,
    ) -> Bank:
        """Open and validate: format version, fingerprint, arrays, done markers, shard file sizes, and every
        per-row array's file against its marker's crc32 (``check_rows``; ``bank verify`` turns it off to report
        bad shards instead of failing). ``verify_chunks``: when each feature / pixel chunk's crc32c is checked as
        it is read: ``always``, ``first`` (the first time this process reads the chunk: what training uses) or
        ``never`` (format v2; a v1 bank has none and warns :class:`BankFormatWarning`)."""
        if verify_chunks not in CHUNK_CHECKS:
            raise ValueError(f"verify_chunks={verify_chunks!r}: one of {', '.join(CHUNK_CHECKS)}")
        path = Path(path)
        # 1. attributes: version and fingerprint
        attrs = read_bank_attrs(path)
        try:
            spec = BankSpec.from_dict(attrs["spec"])
        except TypeError as exc:
            raise BankError(
                f"{path / 'zarr.json'}: the recorded bank spec is invalid ({exc}); re-encode"
            ) from exc
        if spec.fingerprint() != attrs["fingerprint"]:
            raise BankError(
                f"{path}: the recorded fingerprint does not match the recorded spec (the attributes were edited); "
                "re-encode the bank"
            )
        version = attrs["format_version"]
        if not has_chunk_checksums(version):
            warnings.warn(f"{path}: {NO_CHUNK_CHECKSUMS}", BankFormatWarning, stacklevel=2)
        side = side_dir_for(path, version)
        # 2. arrays: names, shapes, dtypes, shard layout
        check_arrays(path, spec, version)
        # 3. done markers and the files they vouch for
        markers: dict[int, dict[str, Any]] = {}
        missing_markers = []
        for shard in range(spec.num_shards):
            record = read_marker(side, shard, fingerprint=spec.fingerprint(), bank_id=attrs.get("bank_id"))
            if record is None:
                missing_markers.append(shard)
                continue
            check_marker_files(path, shard, record, f"shard {shard}", repair_hint(path, shard, version))
            markers[shard] = record
        if require_complete and missing_markers:
            if not side.is_dir():
                raise BankError(
                    f"{path}: its side folder {side} (the done markers) is missing: copy or move it together "
                    "with the bank, or re-run encode to rewrite every shard"
                )
            raise BankError(
                f"{path} is incomplete: {len(missing_markers)} of {spec.num_shards} shards not written "
                f"(first: {missing_markers[:10]}). Re-run encode to finish it (it resumes), or open with "
                "require_complete=False"
            )
        # 4. the per-row arrays, read straight from their files and checked (tiny next to the features)
        row_meta = _read_row_meta(path, spec, markers, version, check=check_rows)
        # 5. soft labels, when the bank declares them: their spec, arrays, markers and file sizes
        labels = _open_labels(path, spec, attrs, side)
        return cls(path, attrs, spec, markers, row_meta, verify_chunks=verify_chunks, labels=labels)

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
        """``summary.json`` of the last finished encode (None before one, or when it is a deleted bank's)."""
        file = self.side / SUMMARY_FILE
        if not file.exists():
            return None
        data = json.loads(file.read_text())
        if self.bank_id is not None and data.get("bank_id") != self.bank_id:
            return None
        return data

    @property
    def labels(self) -> LabelsSpec | None:
        """The bank's soft labels (``dreamteacher interpret``) when every shard's are written, else None."""
        if self.labels_spec is None or len(self.label_markers) < self.spec.num_shards:
            return None
        return self.labels_spec

    def require_labels(self) -> LabelsSpec:
        """:attr:`labels`, or a one-line :class:`BankError` saying how to get them."""
        if self.labels_spec is None:
            raise BankError(
                f"{self.path} holds no soft labels: run `dreamteacher interpret` (make interpret BANK={self.path}) "
                "first, or distill without mix (distill.loss.mix=false)"
            )
        if self.labels is None:
            missing = self.spec.num_shards - len(self.label_markers)
            raise BankError(
                f"{self.path}: its soft labels are incomplete ({missing} of {self.spec.num_shards} shards not "
                "written); re-run `dreamteacher interpret` (make interpret) to finish them (it resumes)"
            )
        return self.labels_spec

    def keys(self, rows: Sequence[int] | slice) -> list[str]:
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r")
        return decode_keys(np.asarray(self._group["key"][_as_index_array(rows, self.num_rows)]))

    def array_defs(self, levels: list[str] | None = None) -> list[ArrayDef]:
        """Sharded arrays needed for ``levels`` (all levels when None), image first."""
        names = set(levels) if levels is not None else {lv.name for lv in self.levels}
        for name in names:
            self.spec.level(name)  # unknown level -> BankError
        return [d for d in self._defs if d.sharded and (d.path == "image" or d.level in names)]

    # ---- the hot path --------------------------------------------------------------------------------------
    def read_rows(
        self,
        rows: Sequence[int] | slice,
        levels: list[str] | None = None,
        *,
        mirror: np.ndarray | None = None,
        labels: bool = False,
    ) -> dict[str, Any]:
        """Rows as numpy: ``image`` uint8 (n, 3, H, W), ``targets`` {level: {part: encoded array}} (NOT decoded),
        ``row``, ``source_index``, ``draw``, ``flip``, ``seed``, ``ok`` (n,); with ``labels``, ``labels``
        {part: encoded array} too: the soft labels of each requested view (``bank.labels``; the mirrored view's
        own when ``mirror``), or a :class:`BankError` when the bank has none complete.

        ``image`` is each row's view: a flipped row's pixels are mirrored whether the bank stores them so
        (``pixels: rows``) or once per image. ``mirror`` (n,) bool: rows whose pixels are mirrored on top (the
        flipped view of a mirrored bank, ``spec.mirror``); their targets are NOT mirrored here (they are encoded:
        the caller mirrors them after decoding, on the device: ``bank.dataset.decode_targets``).

        The image and target arrays are views into one batch buffer from a small per-bank pool; a buffer is
        reused only once no view of it (nor a tensor made from one) is alive, so a returned batch is never
        overwritten while anyone can still see it."""
        index = _as_index_array(rows, self.num_rows)
        n = len(index)
        to_mirror = np.zeros(n, bool) if mirror is None else np.asarray(mirror, bool).reshape(n)
        if labels:
            self.require_labels()
        # 1. one buffer for the whole batch, one (n, row_nbytes) segment per array
        defs, starts, row_block = self._batch_layout(levels, labels)
        buffer = self._buffers.take(n * row_block)
        segments = {
            d.path: buffer[n * start : n * (start + d.row_nbytes)].reshape(n, d.row_nbytes)
            for d, start in zip(defs, starts, strict=True)
        }
        # 2. rows grouped by shard; each (array, shard) reads its rows straight into their batch slots
        spec = self.spec
        shard_of = index // spec.shard_rows
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for group in np.split(order, bounds) if n else []:
            shard = int(shard_of[group[0]])
            if shard not in self.markers:
                raise BankError(f"{self.path}: rows of shard {shard} requested but the shard is not written")
            local = index[group] - shard * spec.shard_rows
            if labels and shard not in self.label_markers:
                raise BankError(f"{self.path}: soft labels of shard {shard} requested but not written")
            # as lists, made once for every array (the per-array reads are plain Python: ShardFile.read_into)
            slots, local_row = group.tolist(), local.tolist()
            local_image = (local // spec.views_per_image).tolist()  # pixels stored once per image
            local_view = (local * 2 + to_mirror[group]).tolist() if spec.mirror else local_row  # one per view
            for d in defs:
                entries = local_image if d.per_image else local_view if d.per_view else local_row
                self._files.get(d, shard).read_into(entries, segments[d.path], slots)
        # 3. typed views: image (n, 3, H, W), targets {level: {part: (n, *part_shape)}}
        out: dict[str, Any] = {"targets": {}}
        for d in defs:
            view = segments[d.path].view(d.dtype).reshape(n, *d.row_shape)
            if d.path == "image":
                out["image"] = view
            elif d.per_view:
                out.setdefault("labels", {})[d.part] = view
            else:
                out["targets"].setdefault(d.level, {})[d.part] = view
        out["row"] = index
        for name, values in self.row_meta.items():
            out[name] = values[index]
        # 4. views the stored pixels do not hold as such: flipped rows of pixels once per image, mirrored views
        if "image" in out:
            to_mirror = to_mirror.copy()
            if spec.pixels == "image":
                to_mirror ^= out["flip"] == 1
            if to_mirror.any():
                out["image"][to_mirror] = out["image"][to_mirror][..., ::-1]
        return out

    def _batch_layout(
        self, levels: list[str] | None, labels: bool = False
    ) -> tuple[list[ArrayDef], list[int], int]:
        """Arrays to read, each one's start inside a row block (64-byte aligned), and the block's size."""
        key = (None if levels is None else tuple(levels), labels)
        if key not in self._layouts:
            defs = self.array_defs(levels) + (self._label_defs if labels else [])
            starts, total = [], 0
            for d in defs:
                starts.append(total)
                total += -(-d.row_nbytes // _ALIGN) * _ALIGN
            self._layouts[key] = (defs, starts, total)
        return self._layouts[key]

    def decode_rows(
        self, rows: Sequence[int] | slice, levels: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Convenience (tools, tests): rows decoded to float32 numpy on the CPU."""
        import torch

        batch = self.read_rows(rows, levels)
        out = {}
        for level, parts in batch["targets"].items():
            decoded = self.codecs[level].decode({k: torch.from_numpy(v) for k, v in parts.items()})
            if level in self.projections:
                decoded = self.projections[level].unproject(decoded)
            out[level] = decoded.numpy()
        return out


class BufferPool:
    """Reusable uint8 batch buffers, handed out only when nothing else references them.

    A fresh 50 MB ``np.empty`` per batch costs a page fault (and the kernel's zeroing) per 4 KiB page on first
    write: about as much time as the read itself (profiled). Every array :meth:`take` returns is a view whose
    ``base`` is the pooled buffer, and ``torch.from_numpy`` keeps its array alive, so a buffer's reference count
    is back to the pool's own exactly when no batch array, view or tensor of it is left anywhere (including a
    DataLoader worker's send queue). Busy buffers are never touched; when all are busy a fresh one is allocated.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A (nbytes,) uint8 view of a buffer nobody else holds."""
        with self._lock:
            for i in range(len(self._buffers)):
                if sys.getrefcount(self._buffers[i]) == _FREE_REFS:  # only the pool's list holds it
                    if self._buffers[i].nbytes < nbytes:
                        self._buffers[i] = np.empty(nbytes, dtype=np.uint8)
                    return self._buffers[i][:nbytes]
            buffer = np.empty(nbytes, dtype=np.uint8)
            if len(self._buffers) < self.capacity:
                self._buffers.append(buffer)
            return buffer[:nbytes]


def _read_row_meta(
    path: Path, spec: BankSpec, markers: dict[int, dict[str, Any]], version: int, *, check: bool
) -> dict[str, np.ndarray]:
    """The per-row arrays of every written shard, each file checked against its marker's crc32 (and its chunk
    crc32c in v2) when ``check``; rows of shards not written stay zero. ``key`` is checked, not kept."""
    defs = {d.path: d for d in array_defs(spec) if not d.sharded}
    out = {name: np.zeros(spec.num_rows, dtype=defs[name].dtype) for name in ROW_ARRAYS}
    checksum = has_chunk_checksums(version)
    for shard, record in markers.items():
        span = spec.shard_range(shard)
        for name, adef in defs.items():
            if name == "key" and not check:
                continue
            rows = read_row_chunk(
                path,
                adef,
                shard,
                spec.shard_rows,
                checksum=checksum,
                marker=record if check else {},
                verify=check,
            )
            if name in out:
                out[name][span.start : span.stop] = rows[: len(span)]
    return out


def _open_labels(
    path: Path, spec: BankSpec, attrs: dict[str, Any], side: Path
) -> tuple[LabelsSpec, dict[int, dict[str, Any]]] | None:
    """The declared soft labels' spec and the done markers of their written shards (each marker's files present
    at the recorded size), or None when the bank declares none."""
    recorded = read_labels_attrs(path)
    if recorded is None:
        return None
    try:
        labels = LabelsSpec.from_dict(recorded["spec"])
    except (KeyError, TypeError) as exc:
        raise BankError(
            f"{path / 'zarr.json'}: the recorded soft-label spec is invalid ({exc}); re-write the labels with "
            "`dreamteacher interpret --overwrite`"
        ) from exc
    fingerprint = labels.fingerprint(attrs["fingerprint"])
    if recorded.get("fingerprint") != fingerprint:
        raise BankError(
            f"{path}: its soft labels were written for other bank contents or edited (fingerprint mismatch); "
            "re-write them with `dreamteacher interpret --overwrite`"
        )
    check_arrays(path, spec, attrs["format_version"], label_array_defs(labels, spec))
    markers = {}
    for shard in range(spec.num_shards):
        record = read_label_marker(side, shard, fingerprint=fingerprint, bank_id=attrs.get("bank_id"))
        if record is None:
            continue
        hint = repair_hint(path, shard, attrs["format_version"], labels=True)
        check_marker_files(path, shard, record, f"soft labels of shard {shard}", hint)
        markers[shard] = record
    return labels, markers


def check_marker_files(path: Path, shard: int, record: dict[str, Any], what: str, hint: str) -> None:
    """Every file a done marker vouches for is there at its recorded size (the cheap check at open; the
    crc32c are checked as chunks are read, and by ``bank verify``), else a :class:`BankError` ending in ``hint``."""
    for rel, check in record["files"].items():
        file = path / rel
        size = file.stat().st_size if file.exists() else None
        if size != check["nbytes"]:
            state = (
                "missing"
                if size is None
                else f"truncated/changed ({size} bytes, marker says {check['nbytes']})"
            )
            raise BankError(f"{path}: {what} file {rel} is {state}. {hint}")


def _as_index_array(rows: Sequence[int] | slice, num_rows: int) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(num_rows, dtype=np.int64)[rows]
    index = np.asarray(rows, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= num_rows):
        raise BankError(
            f"row index out of range 0..{num_rows - 1}: {index[(index < 0) | (index >= num_rows)][:5]}"
        )
    return index
