"""Soft labels in a bank: the feature interpreter's per-pixel class logits for every training view.

``dreamteacher interpret`` writes them; mix distillation reads them beside the features. They are an optional
addition to a finished bank, so they never touch its identity: the bank's fingerprint, arrays and done markers
stay as encode wrote them, and re-writing the labels (another interpreter, stride or codec) never re-encodes.

On disk (``docs/bank-format.md``, "Soft labels"):

- arrays ``labels/<part>`` in the bank's group, one per part of the labels' codec (``labels/values`` for fp16;
  ``q``/``scale``/``offset`` for int8, ...), shape ``(views, K, h, w)`` with chunk = one view and shard = one
  bank shard's views, the same compressor and per-chunk crc32c as the features. A view is a bank row, or for a
  mirrored bank (``spec.mirror``) ``2 * row + flip``: each view's logits come from that view's own features, the
  flipped view's from the mirrored features (the interpreter is not mirror-equivariant, so mirroring the logits
  would not give the same thing);
- the :class:`LabelsSpec` under the group attribute ``dreamteacher_labels`` (beside, not inside, the bank's own
  ``dreamteacher_bank``), with its fingerprint, which covers the bank's;
- per shard, a done marker ``labels/done/NNNNNN.json`` in the bank's side folder, written last (atomic, after
  an fsync of the shard's files), exactly as encode marks its shards: a killed ``interpret`` re-writes only the
  shards without one, deterministically, so the result is byte-identical to an uninterrupted run.

One writer at a time (no claims: soft labels of a whole bank take minutes, not the days a bank's encode does).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bank.codecs import CODECS, codec_for, get_compressor
from bank.layout import (
    ATTRS_KEY,
    ArrayDef,
    DurableBatch,
    check_arrays,
    create_arrays,
    fsync_dir,
    host_tag,
    make_dirs,
    no_space_error,
    read_bank_attrs,
    read_json_file,
    read_marker,
    side_dir_for,
    views_per_row,
    write_json,
    write_sharded_rows,
)
from bank.spec import BankError, BankSpec, LevelSpec, canonical_json, done_marker_name

__all__ = ["LABELS_ATTRS_KEY", "LabelsSpec", "LabelsWriter", "label_array_defs"]

LABELS_ATTRS_KEY = "dreamteacher_labels"
"""Group attribute holding the soft labels' spec and fingerprint."""
GROUP = "labels"
"""Zarr group of the label arrays, and the side folder's subfolder of their done markers."""
OVERWRITE_HINT = (
    "re-run with `dreamteacher interpret --overwrite` (make interpret ARGS=--overwrite) to replace them"
)


@dataclass(frozen=True)
class LabelsSpec:
    """What a bank's soft labels are: their shape per view, codec, and the interpreter that made them."""

    num_classes: int
    height: int
    width: int
    stride: int
    """``image_size / height``: the logits' stride in input pixels."""
    codec: str
    """Name in ``bank.codecs.CODECS`` (with the bank's codec parameters, e.g. its int4 group)."""
    interpreter: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The interpreter's identity: sha256 of its file, class names, the levels it reads, its test mIoU, ..."""

    def __post_init__(self) -> None:
        problems = [
            f"{name}={getattr(self, name)} must be a positive integer"
            for name in ("num_classes", "height", "width", "stride")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if self.codec not in CODECS:
            problems.append(f"codec {self.codec!r} is not one of {sorted(CODECS)}")
        if problems:
            raise BankError("invalid LabelsSpec: " + "; ".join(problems))

    @property
    def level(self) -> LevelSpec:
        """The labels as a codec sees them: a level of ``num_classes`` channels."""
        return LevelSpec(GROUP, self.stride, self.num_classes, self.height, self.width, self.codec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelsSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise BankError(
                f"the recorded soft-label spec has unknown keys {unknown}: written by a newer release?"
            )
        return cls(**data)

    def fingerprint(self, bank_fingerprint: str) -> str:
        """sha256 of this spec together with the bank's fingerprint: labels belong to one bank's content."""
        text = canonical_json({"labels": self.to_dict(), "bank": bank_fingerprint})
        return hashlib.sha256(text.encode()).hexdigest()


def label_array_defs(labels: LabelsSpec, bank_spec: BankSpec) -> list[ArrayDef]:
    """The label arrays (one per codec part), one entry per training view."""
    codec = codec_for(labels.codec, bank_spec)
    return [
        ArrayDef(f"{GROUP}/{part}", layout.dtype, layout.row_shape, True, GROUP, part, per_view=True)
        for part, layout in codec.parts(labels.level).items()
    ]


def read_labels_attrs(path: Path) -> dict[str, Any] | None:
    """``{"spec", "fingerprint", ...}`` of the bank's soft labels (None when it has none)."""
    attrs = read_json_file(Path(path) / "zarr.json", "group metadata").get("attributes") or {}
    return attrs.get(LABELS_ATTRS_KEY)


def labels_side(bank_side: Path) -> Path:
    """Folder of the labels' done markers inside the bank's side folder."""
    return bank_side / GROUP


def read_label_marker(
    bank_side: Path, shard: int, *, fingerprint: str, bank_id: str | None
) -> dict[str, Any] | None:
    return read_marker(
        labels_side(bank_side),
        shard,
        fingerprint=fingerprint,
        bank_id=bank_id,
        rerun="dreamteacher interpret",
    )


class LabelsWriter:
    """Writes a bank's soft labels shard by shard (:meth:`open` creates or resumes them)."""

    def __init__(self, path: Path, spec: LabelsSpec, meta: dict[str, Any]) -> None:
        """``meta``: the bank's ``dreamteacher_bank`` attribute (:func:`bank.layout.read_bank_attrs`)."""
        self.path, self.spec = Path(path), spec
        self.bank_spec = BankSpec.from_dict(meta["spec"])
        self.bank_fingerprint: str = meta["fingerprint"]
        self.bank_id: str | None = meta.get("bank_id")
        self.format_version: int = meta["format_version"]
        self.side = side_dir_for(self.path, self.format_version)
        self.fingerprint = spec.fingerprint(self.bank_fingerprint)
        self.defs = label_array_defs(spec, self.bank_spec)
        self.codec = codec_for(spec.codec, self.bank_spec)
        compressor = get_compressor(self.bank_spec.compressor)
        self._encoders = {
            d.path: compressor.chunk_encoder(np.dtype(d.dtype).itemsize) if compressor else None
            for d in self.defs
        }

    @classmethod
    def open(cls, path: str | Path, spec: LabelsSpec, *, overwrite: bool = False) -> LabelsWriter:
        """The bank's labels with ``spec``: resumed when the bank holds labels of the same spec, else created.

        Labels of another spec are a :class:`BankError` naming both fingerprints and the differences, unless
        ``overwrite`` (they are removed first). Creation is crash-safe: the arrays first, the attribute that
        declares them last; arrays without the attribute are a crashed creation's and are replaced."""
        path = Path(path)
        meta = read_bank_attrs(path)
        if meta["format_version"] < 2:
            raise BankError(
                f"{path} is a format v1 bank; soft labels need format v2 or later (per-chunk checksums and the "
                "side folder): re-encode it with `dreamteacher encode --overwrite`"
            )
        writer = cls(path, spec, meta)
        size = writer.bank_spec.image_size
        expected = (size // spec.stride, size // spec.stride)
        if size % spec.stride or (spec.height, spec.width) != expected:
            raise BankError(
                f"soft labels of {spec.height}x{spec.width} at stride {spec.stride} do not fit the bank's "
                f"{size}px images (expected {expected[0]}x{expected[1]})"
            )
        recorded = read_labels_attrs(path)
        if recorded is not None and recorded.get("fingerprint") == writer.fingerprint:
            check_arrays(path, writer.bank_spec, writer.format_version, writer.defs)
            make_dirs(labels_side(writer.side) / "done", set())
            return writer
        if recorded is not None and not overwrite:
            try:
                old = LabelsSpec.from_dict(recorded["spec"])
                differences = _differences(old.to_dict(), spec.to_dict())
            except (BankError, KeyError, TypeError):
                differences = ["(the recorded spec is unreadable)"]
            raise BankError(
                f"{path} already holds other soft labels (sha256 {str(recorded.get('fingerprint'))[:12]}, these "
                f"would be {writer.fingerprint[:12]}); differing settings (existing -> new): "
                + "; ".join(differences)
                + f". To replace them: {OVERWRITE_HINT}"
            )
        writer._create(recorded is not None)
        return writer

    def _create(self, replace: bool) -> None:
        try:
            if replace:  # 1. withdraw the old labels' declaration first: a crash from here leaves no labels
                _set_labels_attr(self.path, None)
            _remove_labels_files(self.path, self.side)
            # 2. the arrays at final size, then the markers' folder
            group = zarr.open_group(self.path, mode="r+")
            create_arrays(group, self.bank_spec, self.format_version, self.defs)
            make_dirs(labels_side(self.side) / "done", set())
            fsync_dir(labels_side(self.side))
            # 3. the declaration, last
            _set_labels_attr(
                self.path,
                {"spec": self.spec.to_dict(), "fingerprint": self.fingerprint, "codec": self.codec.config()},
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(self.path, exc) from exc
            raise

    # ---- progress ------------------------------------------------------------------------------------------
    def marker(self, shard: int) -> dict[str, Any] | None:
        self.bank_spec.shard_range(shard)  # range check
        return read_label_marker(self.side, shard, fingerprint=self.fingerprint, bank_id=self.bank_id)

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.bank_spec.num_shards) if self.marker(s) is None]

    @property
    def done(self) -> bool:
        return not self.pending_shards()

    def views(self, shard: int) -> range:
        """The training views of ``shard``, in the order :meth:`write_shard` takes their logits."""
        span, per_row = self.bank_spec.shard_range(shard), views_per_row(self.bank_spec)
        return range(span.start * per_row, span.stop * per_row)

    # ---- writing -------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, logits_VKhw: torch.Tensor) -> dict[str, Any]:
        """Encode and write the logits of every view of ``shard`` (:meth:`views`), then its done marker (last,
        atomic, durable). Idempotent."""
        views = self.views(shard)
        expected = (len(views), self.spec.num_classes, self.spec.height, self.spec.width)
        if tuple(logits_VKhw.shape) != expected:
            raise BankError(
                f"soft labels of shard {shard} are {tuple(logits_VKhw.shape)}, expected {expected}"
            )
        marker = labels_side(self.side) / done_marker_name(shard)
        try:
            # 1. a rewrite first withdraws the marker (durably): a crash mid-rewrite leaves the shard pending
            if marker.exists():
                marker.unlink(missing_ok=True)
                fsync_dir(marker.parent)
            # 2. every part's shard file under a temporary name, then all fsynced and renamed into place
            payload = self.codec.encode(logits_VKhw)
            batch, files = DurableBatch(), {}
            try:
                for adef in self.defs:
                    values = payload[adef.part].cpu().numpy()
                    files |= write_sharded_rows(
                        self.path, adef, shard, values, self.bank_spec, self._encoders[adef.path],
                        checksum=True, batch=batch,
                    )  # fmt: skip
                batch.commit()
            except BaseException:
                batch.abort()
                raise
            # 3. the marker
            record = {
                "shard": shard,
                "views": [views.start, views.stop],
                "files": files,
                "fingerprint": self.fingerprint,
                "bank_id": self.bank_id,
            }
            write_json(marker, record)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(getattr(exc, "filename", None) or self.path, exc) from exc
            raise
        return {"shard": shard, "views": len(views), "bytes": sum(f["nbytes"] for f in files.values())}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _set_labels_attr(path: Path, value: dict[str, Any] | None) -> None:
    """Set (or with None remove) the labels' group attribute by an atomic rewrite of the group's ``zarr.json``;
    the bank's own attribute is left as it is (checked)."""
    file = path / "zarr.json"
    meta = read_json_file(file, "group metadata")
    attrs = dict(meta.get("attributes") or {})
    if ATTRS_KEY not in attrs:
        raise BankError(f"{path} is not a DreamTeacher bank (no {ATTRS_KEY!r} attribute)")
    if value is None:
        attrs.pop(LABELS_ATTRS_KEY, None)
    else:
        attrs[LABELS_ATTRS_KEY] = value
    write_json(file, {**meta, "attributes": attrs})


def _remove_labels_files(path: Path, side: Path) -> None:
    """Remove the label arrays and their markers (renamed aside first, so that a crash leaves only an orphan)."""
    for target in (path / GROUP, labels_side(side)):
        if not target.exists():
            continue
        aside = target.with_name(f".{target.name}.deleting-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
