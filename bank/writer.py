"""Writing a bank: create it whole, then writers claim whole shards, write them and mark each done last.

Crash safety: arrays are created at final size inside a temporary folder that is renamed into place, so a bank
either exists completely or not at all; two processes creating one bank at once end with one bank (the loser
reopens the winner's when the settings match). A shard's done marker (``done/NNNNNN.json`` in the bank's side
folder: file sizes, crc32 of every shard file, rejects, ranges) is written by an atomic rename AFTER all its
files, and only once those files and their folders are fsynced, so after a power loss a marker never vouches
for bytes that did not reach the disk. A shard without a marker is rewritten by the next run, and writing is
deterministic, so ``kill -9`` at any moment + re-run gives an identical bank.

Several writers (processes, clusters) split one bank's shards with :meth:`BankWriter.claim`: an exclusive
claim file per shard, with its owner and a lease that a heartbeat renews; a stale claim (lease expired, or
its owner's process gone from this machine) is taken over.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import platform
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from bank.codecs import codec_for, get_compressor
from bank.config import BankConfig
from bank.layout import (
    ATTRS_KEY,
    SUMMARY_FILE,
    DurableBatch,
    array_defs,
    check_arrays,
    create_arrays,
    decode_keys,
    encode_keys,
    fsync_dir,
    has_chunk_checksums,
    host_key,
    host_tag,
    make_dirs,
    no_space_error,
    owner_gone,
    pid_alive,
    read_bank_attrs,
    read_marker,
    remove_stale_tmp,
    side_dir,
    side_dir_for,
    write_file,
    write_json,
    write_raw_chunk,
    write_sharded_rows,
)
from bank.projection import (
    Projection,
    check_projection_config,
    config_fit_record,
    fit_chooses,
    read_projections,
    write_projections,
)
from bank.spec import (
    ROW_ARRAYS,
    SUPPORTED_FORMAT_VERSIONS,
    BankError,
    BankSpec,
    LevelSpec,
    claim_dir_name,
    done_marker_name,
    feature_array_name,
)

__all__ = [
    "ATTRS_KEY",
    "SUMMARY_FILE",
    "BankWriter",
    "Claim",
    "ShardRows",
    "decode_keys",
    "encode_keys",
    "read_bank_attrs",
    "side_dir",
    "spec_from_config",
]

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 120.0
"""A claim's lease; its heartbeat renews it every quarter lease, so only a frozen or vanished owner lets it
lapse. Another machine's crashed writer blocks its shard for at most this long."""
ORPHAN_AGE_S = 600.0
"""A ``.<bank>.creating-*`` folder of another machine is removed once this old (creating a bank takes seconds);
this machine's are removed as soon as their process is gone."""
OVERWRITE_HINT = (
    "re-run with `dreamteacher encode --overwrite` (make encode ARGS=--overwrite) to replace it, or choose "
    "another bank path (encode.bank=..., make encode BANK=...)"
)


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
    mean_of: int = 1,
    mirror: bool = False,
) -> BankSpec:
    """A :class:`BankSpec` whose shard size, codecs, compressor and pixel layout come from ``cfg``; ``mean_of``
    and ``mirror`` are the encode settings of the rows (``encode.store=mean``, ``encode.flips=mirror``).

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
    check_projection_config(cfg, level_specs)
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
        int4_group=cfg.int4_group,
        mean_of=mean_of,
        mirror=mirror,
        pixels=cfg.pixels,
        pixel_compressor=cfg.pixel_compressor,
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


def _absmax_of_rows(feats_SCHW: torch.Tensor, ok: np.ndarray) -> float:
    """max |x| over the rows where ``ok`` (0.0 when none): one min/max pass, no |x| temporary, no row copy when
    every row is OK (profiled: ``x[ok].abs().amax()`` was a quarter of an ADM-256 shard's write on CPU)."""
    if not ok.any():
        return 0.0
    sel = feats_SCHW if ok.all() else feats_SCHW[torch.from_numpy(ok).to(feats_SCHW.device)]
    lo, hi = torch.aminmax(sel)
    return max(-float(lo), float(hi))


class BankWriter:
    """Writes whole shards of a bank created at final size (:meth:`create`).

    ``format_version`` and ``bank_id`` come from the bank's attributes: a version 1 bank (written before
    per-chunk checksums) is resumed in its own layout.
    """

    def __init__(self, path: Path, spec: BankSpec) -> None:
        self.path, self.spec = Path(path), spec
        meta = read_bank_attrs(self.path)
        self.format_version: int = meta["format_version"]
        self.bank_id: str | None = meta.get("bank_id")
        self.checksum = has_chunk_checksums(self.format_version)
        self.side = side_dir_for(self.path, self.format_version)
        self.arrays = {adef.path: adef for adef in array_defs(spec)}
        self._chunk_encoders = {
            adef.path: compressor.chunk_encoder(np.dtype(adef.dtype).itemsize)
            for adef in self.arrays.values()
            if (compressor := get_compressor(adef.compressor_name(spec))) is not None
        }
        self.codecs = {lv.name: codec_for(lv.codec, spec) for lv in spec.levels}
        self.projections: dict[str, Projection] = read_projections(self.path, spec.levels)
        """Bases of the projected levels (``bank.projection``), read from the bank and checked against the spec."""

    # ---- creation / resume ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        spec: BankSpec,
        cfg: BankConfig,
        *,
        overwrite: bool = False,
        format_version: int | None = None,
        projections: dict[str, Projection] | None = None,
    ) -> BankWriter:
        """New bank (all arrays at final size), or the existing one with the same fingerprint, opened to resume.

        Safe to call from several processes at once: exactly one creates the bank, the others open it (or, with
        other settings, get a :class:`BankError` listing the differences). ``overwrite`` replaces only a bank
        that existed before this call, never one a concurrent call has just created. Orphaned
        ``.<bank>.creating-*`` folders of crashed creators are removed (and logged). ``format_version``: None
        = the oldest format that holds ``spec`` (:meth:`BankSpec.format_version`); others are for compatibility
        tests only. ``projections``: the fitted bases of the spec's projected levels (``bank.projection``),
        stored in a new bank before any shard; an existing bank's own are used (and checked against the spec).
        """
        path = Path(path)
        _check_spec_matches_config(spec, cfg)
        format_version = spec.format_version() if format_version is None else format_version
        if format_version not in SUPPORTED_FORMAT_VERSIONS or format_version < spec.format_version() == 3:
            raise BankError(
                f"format_version={format_version}; supported: {SUPPORTED_FORMAT_VERSIONS} (this bank's "
                f"settings need {spec.format_version()})"
            )
        for message in clean_orphans(path):
            log.warning("%s", message)
        may_overwrite, raced = overwrite, False
        for _attempt in range(5):
            if (path / "zarr.json").exists():
                writer = cls._open_existing(path, spec, overwrite=may_overwrite, raced=raced)
                if writer is not None:
                    return writer
            elif path.exists() and (not path.is_dir() or any(path.iterdir())):
                if not may_overwrite:
                    raise BankError(
                        f"{path} exists and is not a bank (no zarr.json); remove it, or {OVERWRITE_HINT}"
                    )
                _remove_bank(path)
            tmp = _build_bank_folder(path, spec, format_version, projections or {})
            try:
                os.rename(tmp, path)  # atomic; replaces an empty folder, fails on a non-empty one
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    log.info("another process created %s first; opening its bank", path)
                    # another process created it meanwhile: never replace it
                    may_overwrite, raced = False, True
                    continue
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise no_space_error(path, exc) from exc
                raise
            fsync_dir(path.parent)
            writer = cls(path, spec)
            writer._ensure_side()
            return writer
        raise BankError(f"could not create or open the bank at {path}: other processes keep replacing it")

    @classmethod
    def _open_existing(
        cls, path: Path, spec: BankSpec, *, overwrite: bool, raced: bool = False
    ) -> BankWriter | None:
        """The bank at ``path`` opened for resume; None when ``overwrite`` removed it (a different or damaged
        bank)."""
        try:
            meta = read_bank_attrs(path)
            existing = BankSpec.from_dict(meta["spec"])
        except (BankError, TypeError) as exc:
            if not overwrite:
                raise BankError(f"{exc}\nTo replace it: {OVERWRITE_HINT}") from exc
            _remove_bank(path)
            return None
        if existing.fingerprint() == spec.fingerprint():
            try:
                writer = cls(path, spec)
            except BankError:  # e.g. a projection basis that no longer matches its sha256
                if not overwrite:
                    raise
                _remove_bank(path)
                return None
            check_arrays(path, spec, writer.format_version)
            writer._ensure_side()
            return writer
        if not overwrite:
            what = "another process created a different bank" if raced else "a different bank already exists"
            raise BankError(
                f"{what} at {path}; differing settings (existing -> new):\n  "
                + "\n  ".join(existing.differences(spec))
                + f"\nTo replace it: {OVERWRITE_HINT}"
            )
        _remove_bank(path)
        return None

    def _ensure_side(self) -> None:
        """The side folder and its ``done/`` exist, durably (a marker's folder entry must survive with it)."""
        dirty: set[Path] = set()
        make_dirs(self.side / "done", dirty)
        for folder in dirty:
            fsync_dir(folder)

    # ---- progress ------------------------------------------------------------------------------------------
    def marker(self, shard: int) -> dict[str, Any] | None:
        """``shard``'s done marker (None: not done)."""
        self.spec.shard_range(shard)  # range check
        return read_marker(self.side, shard, fingerprint=self.spec.fingerprint(), bank_id=self.bank_id)

    def is_done(self, shard: int) -> bool:
        return self.marker(shard) is not None

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.spec.num_shards) if not self.is_done(i)]

    # ---- claims --------------------------------------------------------------------------------------------
    def claim(
        self, shard: int, owner: str | None = None, *, lease_s: float = DEFAULT_LEASE_S
    ) -> Claim | None:
        """Claim ``shard`` for writing: a :class:`Claim` (use it as a context manager), or None when the shard
        is done or a live owner holds it.

        The claim is the exclusive creation (``link``) of ``claims/NNNNNN/<generation>.json`` in the side
        folder; a stale claim (lease expired, released, or its process gone from this machine) is taken over by
        creating the next generation, which only one contender can do. A heartbeat thread renews the lease
        every quarter lease. Pass the claim to :meth:`write_shard`, which checks it just before the done marker
        and releases it after; leaving the ``with`` block releases it too (a shard not done is left for the next
        claimer).
        """
        self.spec.shard_range(shard)
        if self.is_done(shard):
            return None
        folder = self.side / claim_dir_name(shard)
        owner = owner or f"{platform.node()}:{os.getpid()}"
        for _attempt in range(16):
            try:
                make_dirs(folder, set())
                current = _current_claim(folder)
                if current is not None and _claim_live(current[1], self.bank_id):
                    return None
                gen = 0 if current is None else current[0] + 1
                claim = Claim(self, shard, gen, owner, lease_s)
                if not claim._create():
                    continue  # another contender took this generation: look again
            except FileNotFoundError:
                continue  # the folder was removed by a finishing owner: look again
            if self.is_done(shard):  # finished by its previous owner between our two looks
                claim.release()
                return None
            claim._start_heartbeat()
            return claim
        return None

    def claim_holder(self, shard: int) -> dict[str, Any] | None:
        """The live claim on ``shard`` (its record: owner, host, pid, expires, ...), or None."""
        folder = self.side / claim_dir_name(shard)
        current = _current_claim(folder) if folder.is_dir() else None
        return current[1] if current is not None and _claim_live(current[1], self.bank_id) else None

    def wait_for_shards(
        self, shards: list[int], *, poll_s: float = 5.0, timeout_s: float | None = None
    ) -> list[int]:
        """Wait while other owners hold claims on ``shards``; returns those still not done once none of them is
        claimed by a live owner (they need writing again), or at ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            pending = [s for s in shards if not self.is_done(s)]
            held = [s for s in pending if self.claim_holder(s) is not None]
            if not held or (deadline is not None and time.monotonic() >= deadline):
                return pending
            time.sleep(poll_s)

    # ---- writing -------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, rows: ShardRows, *, claim: Claim | None = None) -> dict[str, Any]:
        """Write all of ``shard``'s rows, then its done marker (last, atomically, after an fsync of every file
        and folder it vouches for). Idempotent. With ``claim``: refuses to mark the shard done if the claim
        was lost (taken over after its lease lapsed), and releases it after the marker."""
        start_time = time.perf_counter()
        span = self.spec.shard_range(shard)
        if claim is not None and (claim.writer.path != self.path or claim.shard != shard):
            raise BankError(
                f"the claim passed to write_shard({shard}) is for shard {claim.shard} of {claim.writer.path}"
            )
        self._check_rows(shard, span, rows)
        # 1. a rewrite first withdraws the marker (durably), so a crash mid-rewrite leaves the shard pending
        marker = self.side / done_marker_name(shard)
        try:
            make_dirs(marker.parent, set())
            if marker.exists():
                marker.unlink(missing_ok=True)
                fsync_dir(marker.parent)
            # 2. features (codecs run on the tensors' device), pixels, per-row metadata: whole-shard writes,
            #    each file under a temporary name; each returns the checksum of its bytes
            batch = DurableBatch()
            try:
                absmax, files = self._write_arrays(shard, rows, batch)
                # 3. fsync every file, rename it into place, fsync the folders: durable from here on
                batch.commit()
            except BaseException:
                batch.abort()
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(getattr(exc, "filename", None) or self.path, exc) from exc
            raise
        if claim is not None and not claim.held():
            raise BankError(
                f"{self.path}: the claim on shard {shard} was lost (its lease lapsed and another writer took "
                "the shard over); not marking it done"
            )
        # 4. the marker (last, atomic, durable)
        record = {
            "shard": shard,
            "rows": [span.start, span.stop],
            "num_ok": int(np.count_nonzero(rows.ok)),
            "rejects": dict(sorted(rows.rejects.items())),
            "absmax": absmax,
            "files": files,
            "fingerprint": self.spec.fingerprint(),
        }
        if self.bank_id is not None:
            record["bank_id"] = self.bank_id
        write_json(marker, record)
        if claim is not None:
            claim.release()
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
        self, shard: int, rows: ShardRows, batch: DurableBatch
    ) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
        """Write every array's file of ``shard``; returns each level's max |feature| over OK rows (for verify) and
        each file's checksum by its path inside the bank. The files go into ``batch`` (durable at its commit)."""
        absmax: dict[str, float] = {}
        files: dict[str, dict[str, int]] = {}
        for level in self.spec.levels:
            feats_SCHW = rows.features[level.name]
            if isinstance(feats_SCHW, np.ndarray):
                feats_SCHW = torch.from_numpy(feats_SCHW)
            codec, projection = self.codecs[level.name], self.projections.get(level.name)
            ok = np.asarray(rows.ok, dtype=bool)
            if projection is None:
                absmax[level.name] = _absmax_of_rows(feats_SCHW, ok)
                payload = codec.encode(feats_SCHW)
            else:  # k coefficients per position; the range verify checks is that of what a reader decodes
                payload = codec.encode(projection.project(feats_SCHW))
                absmax[level.name] = _absmax_of_rows(projection.unproject(codec.decode(payload)), ok)
            for part, values in payload.items():
                files |= self._write_sharded(
                    shard, feature_array_name(level.name, part), values.cpu().numpy(), batch
                )
        pixels = rows.images_u8
        if self.arrays["image"].per_image:  # once per image: its first row, the unflipped view of draw 0
            pixels = pixels[:: self.spec.views_per_image]
        files |= self._write_sharded(shard, "image", pixels, batch)
        # the per-row arrays: one uncompressed chunk per shard
        per_row = {"key": encode_keys(rows.keys)} | {name: getattr(rows, name) for name in ROW_ARRAYS}
        for name, values in per_row.items():
            adef = self.arrays[name]
            file = adef.shard_file(self.path, shard)
            remove_stale_tmp(file)
            files[str(file.relative_to(self.path))] = write_raw_chunk(
                file, values, adef.dtype, self.spec.shard_rows, checksum=self.checksum, batch=batch
            )
        return absmax, files

    def _write_sharded(
        self, shard: int, name: str, values: np.ndarray, batch: DurableBatch
    ) -> dict[str, dict[str, int]]:
        """One shard file of a sharded array (each row one inner chunk, compressed when the bank is); returns
        ``{path inside the bank: checksum}``."""
        return write_sharded_rows(
            self.path,
            self.arrays[name],
            shard,
            values,
            self.spec,
            self._chunk_encoders.get(name),
            checksum=self.checksum,
            batch=batch,
        )

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
        """Write ``summary.json`` into the side folder (caller's timings etc. plus rows, rejects and bytes from
        the markers)."""
        pending = self.pending_shards()
        if pending:
            raise BankError(
                f"cannot finalize {self.path}: {len(pending)} shard(s) not written: {pending[:20]}"
            )
        rejects: dict[str, str] = {}
        total_bytes, num_ok = 0, 0
        for shard in range(self.spec.num_shards):
            record = self.marker(shard)
            assert record is not None
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
        if self.bank_id is not None:
            data["bank_id"] = self.bank_id
        write_json(self.side / SUMMARY_FILE, data)


class Claim:
    """One writer's claim on one shard (from :meth:`BankWriter.claim`); a context manager that releases it.

    File ``claims/NNNNNN/<generation>.json`` in the side folder: owner, host, pid, token, acquired, expires.
    Generation g+1 supersedes g; only the owner rewrites its own file (renewal, release).
    """

    def __init__(self, writer: BankWriter, shard: int, gen: int, owner: str, lease_s: float) -> None:
        self.writer, self.shard, self.gen, self.owner, self.lease_s = writer, shard, gen, owner, lease_s
        self.folder = writer.side / claim_dir_name(shard)
        self.path = self.folder / f"{gen:06d}.json"
        self.token = secrets.token_hex(8)
        self.acquired = time.time()
        self.released = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(self, *, released: bool = False) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "generation": self.gen,
            "owner": self.owner,
            "host": host_key(),
            "host_tag": host_tag(),
            "pid": os.getpid(),
            "token": self.token,
            "bank_id": self.writer.bank_id,
            "acquired": self.acquired,
            "expires": 0.0 if released else time.time() + self.lease_s,
            "lease_s": self.lease_s,
            "released": released,
        }

    def _create(self) -> bool:
        """Exclusive creation of this generation's file, whole (written aside, then hard-linked: ``link`` fails
        when the name exists, on local file systems and NFS alike)."""
        tmp = self.folder / f".{self.path.name}.{self.token}"
        write_file(tmp, [_json_bytes(self.record())])
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def held(self) -> bool:
        """Whether this is still the shard's newest claim and not released or lost."""
        if self.released or self.lost:
            return False
        try:
            current = _current_claim(self.folder)
        except FileNotFoundError:
            current = None
        ok = current is not None and current[0] == self.gen and current[1].get("token") == self.token
        if not ok:
            self.lost = True
        return ok

    def renew(self) -> bool:
        """Extend the lease (the heartbeat calls this); False once the claim is lost or released."""
        with self._lock:
            if not self.held():
                return False
            write_file(self.path, [_json_bytes(self.record())])
            return True

    def release(self) -> None:
        """Give the shard up: the claims folder is removed when the shard is done, else this claim is marked
        released so that the next claimer takes it at once. Idempotent; never touches a newer owner's claim."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self.released:
                return
            still_ours = self.held()
            self.released = True
            if not still_ours:
                return
            try:
                if self.writer.is_done(self.shard):
                    shutil.rmtree(self.folder, ignore_errors=True)
                else:
                    write_file(self.path, [_json_bytes(self.record(released=True))])
            except (OSError, BankError) as exc:  # the lease lapses anyway
                log.warning("could not release the claim %s: %s", self.path, exc)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.shard}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.renew():
                    if self.lost:
                        log.warning("lost the claim on shard %d of %s", self.shard, self.writer.path)
                    return
            except OSError as exc:
                log.warning("could not renew the claim %s: %s", self.path, exc)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim(shard={self.shard}, gen={self.gen}, owner={self.owner!r}, path={str(self.path)!r})"


def _json_bytes(data: dict[str, Any]) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode()


def _current_claim(folder: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest claim generation in ``folder`` and its record (a damaged file counts as a stale claim)."""
    gens = sorted((int(p.stem) for p in folder.glob("[0-9]*.json") if p.stem.isdigit()), reverse=True)
    for gen in gens:
        try:
            return gen, json.loads((folder / f"{gen:06d}.json").read_bytes())
        except FileNotFoundError:
            continue  # removed by a finishing owner meanwhile
        except ValueError:
            return gen, {"released": True}
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    return None


def _claim_live(record: dict[str, Any], bank_id: str | None) -> bool:
    """A claim blocks others while it is this bank's, not released, within its lease, and (when its owner ran
    on this machine) its process is alive."""
    if record.get("released") or record.get("bank_id") != bank_id:
        return False
    if float(record.get("expires", 0.0)) <= time.time():
        return False
    return not (record.get("host") == host_key() and not pid_alive(int(record.get("pid", -1))))


# ---- creation helpers ------------------------------------------------------------------------------------------
def _build_bank_folder(
    path: Path, spec: BankSpec, format_version: int, projections: dict[str, Projection]
) -> Path:
    """The whole empty bank in a temporary folder beside ``path`` (fsynced), ready to be renamed into place;
    with the projected levels' bases (checked against the spec's sha256 first)."""
    projected = {lv.name: lv for lv in spec.levels if lv.components}
    if set(projections) != set(projected) or any(
        projections[name].sha256() != lv.basis_sha256 for name, lv in projected.items()
    ):
        raise BankError(
            f"creating {path}: the projection bases given ({sorted(projections)}) are not the spec's projected "
            f"levels' ({sorted(projected)}, by sha256); build the spec with bank.projection.with_projections"
        )
    tmp = path.with_name(f".{path.name}.creating-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
    attrs: dict[str, Any] = {
        "format_version": format_version,
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "codecs": {lv.name: codec_for(lv.codec, spec).config() for lv in spec.levels},
        "library_versions": library_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if format_version >= 2:
        # identifies this bank among banks created at the same path (not content: not in the fingerprint);
        # side files left by a deleted bank carry another id and are ignored
        attrs["bank_id"] = uuid.uuid4().hex
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(tmp, mode="w", attributes={ATTRS_KEY: attrs})
        create_arrays(group, spec, format_version)
        write_projections(group, projections, checksum=has_chunk_checksums(format_version))
        if format_version == 1:
            (tmp / "done").mkdir()
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space_error(tmp, exc) from exc
        raise
    return tmp


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (deepest first), then ``root``."""
    for folder, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _remove_bank(path: Path) -> None:
    """Remove the bank (or non-bank folder) at ``path`` and its side folder: renamed aside first, so that the
    path is free at once and a crash mid-removal leaves only an orphan."""
    targets = [path, side_dir_for(path, 2)]
    for target in targets:
        if not target.exists() and not target.is_symlink():
            continue
        if target.is_dir() and not target.is_symlink():
            aside = target.with_name(
                f".{target.name}.deleting-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
            )
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def clean_orphans(path: Path) -> list[str]:
    """Remove the temporary ``.<bank>.creating-*`` / ``.deleting-*`` folders beside ``path`` whose creator is
    gone (its process ended on this machine, or another machine's folder is older than :data:`ORPHAN_AGE_S`);
    returns one message per folder removed or left in place."""
    messages = []
    parent = path.parent
    if not parent.is_dir():
        return messages
    for kind in ("creating", "deleting"):
        for folder in parent.glob(f".{path.name}*.{kind}-*"):
            stem = folder.name.rsplit(f".{kind}-", 1)[1]
            fields = stem.split("-")
            try:
                mtime = folder.stat().st_mtime
            except FileNotFoundError:
                continue
            if len(fields) == 3 and fields[1].isdigit():
                gone = owner_gone(fields[0], int(fields[1]), mtime, ORPHAN_AGE_S)
            else:  # written before owner tags (".<bank>.creating-<pid>"): machine unknown, judged by age
                gone = time.time() - mtime > ORPHAN_AGE_S
            if gone:
                shutil.rmtree(folder, ignore_errors=True)
                messages.append(f"removed {folder}: left by a {kind} process that is gone")
            elif time.time() - mtime > 60:
                messages.append(f"left {folder} in place: another process may still be {kind} the bank")
    return messages


_FITTED = "chosen by the fit (bank.projection_energy / projection_budget)"


def _fitted(cfg: BankConfig, level: LevelSpec, components: int) -> int | str:
    """A level's k as the config spells it: the fit's choice (an energy level's k is > 0; a budget may leave a
    level at its channels, k = 0), else ``components``."""
    if fit_chooses(cfg, level.name) and (components or cfg.projection_budget):
        return _FITTED
    return components


def _check_spec_matches_config(spec: BankSpec, cfg: BankConfig) -> None:
    expected = {
        "shard_rows": cfg.shard_rows,
        "compressor": cfg.compressor,
        "bitround_keepbits": cfg.bitround_keepbits,
        "pixels": cfg.pixels,
        "pixel_compressor": cfg.pixel_compressor,
        **{f"levels.{lv.name}.codec": cfg.level_codecs.get(lv.name, cfg.codec) for lv in spec.levels},
        **{
            f"levels.{lv.name}.components": _FITTED
            if fit_chooses(cfg, lv.name)
            else cfg.projection.get(lv.name, 0)
            for lv in spec.levels
        },
    }
    if any(lv.codec == "int4" for lv in spec.levels):
        expected["int4_group"] = cfg.int4_group
    actual = {
        "shard_rows": spec.shard_rows,
        "compressor": spec.compressor,
        "bitround_keepbits": spec.bitround_keepbits,
        "pixels": spec.pixels,
        "pixel_compressor": spec.pixel_compressor,
        **{f"levels.{lv.name}.codec": lv.codec for lv in spec.levels},
        **{f"levels.{lv.name}.components": _fitted(cfg, lv, lv.components) for lv in spec.levels},
    }
    if any(lv.codec == "int4" for lv in spec.levels):
        actual["int4_group"] = spec.int4_group
    if spec.projection_fit:
        expected["projection_fit"] = config_fit_record(cfg)
        actual["projection_fit"] = spec.projection_fit
    diff = [
        f"{k}: spec {actual[k]!r}, bank config {expected[k]!r}" for k in expected if expected[k] != actual[k]
    ]
    if diff:
        raise BankError(
            "the BankSpec disagrees with the bank config (build it with bank.spec_from_config):\n  "
            + "\n  ".join(diff)
        )
