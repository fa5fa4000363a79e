"""The bank's Zarr v3 arrays, its side files, and a direct reader and writer of the spec-defined shard layout.

Every big array (input pixels, each codec part of each level) has chunk = one row and shard = ``shard_rows``
rows, so one shard is one file per array. The Zarr v3 sharding codec specifies that file: the encoded inner
chunks, then an index of ``(offset, nbytes)`` uint64 little-endian pairs (one per inner chunk, C order,
``2**64 - 1`` twice for an absent chunk) and a 4-byte crc32c of the index. From format version 2 on, every inner
chunk (and every per-row array's chunk) ends with the 4-byte crc32c of its bytes: zarr v3's ``crc32c`` codec,
which zarr-python verifies on every read too. :class:`ShardFile` reads rows straight out of that layout with
``os.preadv`` and checks each chunk's crc32c: zarr-python costs ~1.6 ms per ``a[i]`` call (measured for this
project's benchmarks, docs/benchmarks.md), which caps a reader at ~600 rows/s per process, while reading chunks by
offset from the page cache runs near the raw file-read speed. :func:`write_shard_file` and
:func:`write_raw_chunk` write the shards and the small per-row arrays' chunks the same way (see their
docstrings for why). zarr-python creates the arrays and validates (``bank verify`` compares the two readers;
tests compare the written bytes with zarr-python's).

Side files (done markers, shard claims, ``summary.json``, encode's ``config.yaml``) live in :func:`side_dir`,
a sibling folder ``<bank>.side`` from version 2 on, so that the Zarr group holds nothing a plain zarr reader
does not recognise. Version 1 banks keep them inside the group (they still open).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import socket
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
import zarr.codecs

from bank.codecs import codec_for, get_compressor
from bank.config import ChunkCheck
from bank.spec import (
    FORMAT_VERSION,
    KEY_BYTES,
    SUPPORTED_FORMAT_VERSIONS,
    BankError,
    BankSpec,
    done_marker_name,
    feature_array_name,
)

ATTRS_KEY = "dreamteacher_bank"
"""Group attribute holding the bank's own metadata (format version, spec, fingerprint, ...)."""
SUMMARY_FILE = "summary.json"
"""Name of the run summary inside :func:`side_dir`."""
SIDE_SUFFIX = ".side"
"""Version >= 2: side files live in ``<bank path><SIDE_SUFFIX>`` (e.g. ``banks/demo.zarr.side``)."""
CHUNK_CRC_BYTES = 4
"""Version >= 2: bytes of the crc32c that follows every stored chunk."""

_ABSENT = np.uint64(2**64 - 1)
_ABSENT_INT = 2**64 - 1
_INDEX_CRC_BYTES = 4
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SMALL_SHARD_FILE = 256 * 1024
"""Bytes up to which a reader reads a shard file whole when it opens it (the per-row scales and offsets of the
int8 / int4 codecs, small pixel arrays): a batch then costs one numpy gather for such an array instead of a
``preadv`` per run of rows. At 16 shards open, at most 4 MiB per array in memory."""


def has_chunk_checksums(format_version: int) -> bool:
    """Whether banks of ``format_version`` store a crc32c after every chunk (version 2 on)."""
    return format_version >= 2


def repair_hint(
    bank: Path | str, shard: int, format_version: int = FORMAT_VERSION, *, labels: bool = False
) -> str:
    """The repair step for a damaged shard: withdraw its done marker, re-run encode (it rewrites that shard);
    for the shard's soft labels (``labels``), withdraw their marker and re-run interpret."""
    side = side_dir_for(Path(bank), format_version)
    if labels:
        return (
            f"Repair: delete {side / 'labels' / done_marker_name(shard)} and re-run the same `dreamteacher "
            f"interpret` command (make interpret BANK={bank}); it rewrites only the unmarked shards' soft labels"
        )
    marker = side / done_marker_name(shard)
    return (
        f"Repair: delete {marker} (or run `dreamteacher bank verify --unmark {bank}`) and re-run the same "
        f"`dreamteacher encode` command (make encode BANK={bank}); it rewrites only the unmarked shards"
    )


def no_space_error(path: Path | str, exc: OSError) -> BankError:
    """One clear line for a full disk or an exhausted quota while writing ``path``."""
    return BankError(
        f"no space left on the device while writing {path} ({os.strerror(exc.errno)}): free space there or "
        "choose another bank path (encode.bank=..., make encode BANK=...) and re-run encode; it resumes, "
        "rewriting the unfinished shard"
    )


# ---- metadata files ------------------------------------------------------------------------------------------
def read_json_file(file: Path, what: str = "zarr metadata") -> dict[str, Any]:
    """A JSON object from ``file``; :class:`BankError` naming the file when it is missing or not valid JSON."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise BankError(f"cannot read {file}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BankError(
            f"{file} is not valid JSON ({exc}): the bank's {what} is damaged. Restore the file from a copy, or "
            "re-encode the bank (`dreamteacher encode --overwrite`, make encode ARGS=--overwrite)"
        ) from exc
    if not isinstance(data, dict):
        raise BankError(f"{file} holds a JSON {type(data).__name__}, not the object {what} must be")
    return data


def read_bank_attrs(path: Path | str) -> dict[str, Any]:
    """The bank's own attributes (``group.attrs[ATTRS_KEY]``) with the format version checked.

    Reads ``zarr.json`` directly: a missing bank, an invalid ``zarr.json`` and a group that is not a bank are
    each one :class:`BankError` naming the path and the fix.
    """
    path = Path(path)
    file = path / "zarr.json"
    try:
        meta_file = read_json_file(file, "group metadata")
    except FileNotFoundError as exc:
        what = "the folder holds no zarr.json" if path.is_dir() else "no such folder"
        raise BankError(
            f"no bank at {path} ({what}): check the path (BANK=...), or create the bank with "
            "`dreamteacher encode` (make encode)"
        ) from exc
    if meta_file.get("node_type") != "group" or meta_file.get("zarr_format") != 3:
        raise BankError(f"{file} is not a Zarr v3 group's metadata, so {path} is not a DreamTeacher bank")
    attrs = meta_file.get("attributes") or {}
    if ATTRS_KEY not in attrs:
        raise BankError(f"{path} is a Zarr group but not a DreamTeacher bank (no {ATTRS_KEY!r} attribute)")
    meta = attrs[ATTRS_KEY]
    if meta.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise BankError(
            f"{path} has bank format version {meta.get('format_version')!r}; this code reads versions "
            f"{SUPPORTED_FORMAT_VERSIONS}. Use the matching release of this project or re-encode."
        )
    for key in ("spec", "fingerprint"):
        if key not in meta:
            raise BankError(f"{file}: the bank attributes lack {key!r}; the metadata is damaged, re-encode")
    return meta


def side_dir_for(bank_path: Path, format_version: int) -> Path:
    """Side folder of a bank of known ``format_version``: the group itself for version 1, else the sibling."""
    bank_path = Path(bank_path)
    if format_version == 1:
        return bank_path
    return bank_path.with_name(bank_path.name + SIDE_SUFFIX)


def side_dir(bank_path: str | Path) -> Path:
    """Folder for the bank's side files: ``done/``, ``claims/``, ``summary.json``, encode's ``config.yaml``.

    ``<bank>.side`` beside the group (format version >= 2, and for a bank not created yet), so that plain zarr
    sees only Zarr nodes in the group; the group folder itself for a version 1 bank (written before side files
    moved out). Copy, move and delete the two folders together.
    """
    bank_path = Path(bank_path)
    try:
        version = read_json_file(bank_path / "zarr.json")["attributes"][ATTRS_KEY]["format_version"]
    except (FileNotFoundError, BankError, KeyError, TypeError):
        version = FORMAT_VERSION
    return side_dir_for(bank_path, version)


def read_marker(
    side: Path, shard: int, *, fingerprint: str, bank_id: str | None, rerun: str = "encode"
) -> dict[str, Any] | None:
    """``shard``'s done marker, or None when it is absent or left by a deleted bank at the same path (its
    ``bank_id`` is another bank's; version >= 2). A marker of this bank with another fingerprint, or one that is
    not valid JSON, is a :class:`BankError` naming the file and the fix (re-running the ``rerun`` command)."""
    file = side / done_marker_name(shard)
    try:
        record = json.loads(file.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BankError(
            f"done marker {file} is not valid JSON ({exc}); delete it and re-run {rerun} to rewrite shard {shard}"
        ) from exc
    if not isinstance(record, dict):
        raise BankError(f"done marker {file} is not a JSON object; delete it and re-run {rerun}")
    if bank_id is not None and record.get("bank_id") != bank_id:
        return None
    if record.get("fingerprint") != fingerprint:
        raise BankError(
            f"{file} belongs to a different bank (fingerprint mismatch); delete it and re-run {rerun}"
        )
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically and durably: temporary file, fsync, rename, fsync of the folder."""
    write_file(path, [json.dumps(data, indent=1, sort_keys=True).encode()])


# ---- keys ------------------------------------------------------------------------------------------------------
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


# ---- arrays ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArrayDef:
    """One array of the bank: zarr path, numpy dtype, per-row shape; ``sharded`` arrays use the shard layout."""

    path: str
    dtype: str
    row_shape: tuple[int, ...]
    sharded: bool
    level: str = ""
    part: str = ""
    per_image: bool = False
    """One entry per image, not per row (the pixels of ``BankSpec.pixels = "image"``)."""
    per_view: bool = False
    """One entry per training view: two per stored row of a mirrored bank (the soft labels, ``bank.labels``)."""

    def length(self, spec: BankSpec) -> int:
        """Entries in the whole array (its first dimension)."""
        if self.per_image:
            return spec.num_images
        return spec.num_rows * views_per_row(spec) if self.per_view else spec.num_rows

    def slots(self, spec: BankSpec) -> int:
        """Entries per shard file (inner chunks of a sharded array, rows of a per-row array's chunk)."""
        if self.per_image:
            return spec.images_per_shard
        return spec.shard_rows * views_per_row(spec) if self.per_view else spec.shard_rows

    def compressor_name(self, spec: BankSpec) -> str:
        """The lossless compressor of this array's chunks: the pixels' own when stored once per image."""
        if not self.sharded:
            return "none"
        return spec.pixel_compressor if self.per_image else spec.compressor

    @cached_property  # read once per array and batch on the hot path
    def row_nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    def shard_file(self, root: Path, shard: int) -> Path:
        """File of ``shard`` under the default chunk-key encoding (``c/<shard>/0/...``)."""
        return root / self.path / "c" / "/".join([str(shard)] + ["0"] * len(self.row_shape))


def views_per_row(spec: BankSpec) -> int:
    """Training views per stored row: 2 for a mirrored bank (the row and its mirror), else 1."""
    return 2 if spec.mirror else 1


def split_views(spec: BankSpec, views: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Training views -> (stored rows, which to mirror): view ``2 * row + flip`` of a mirrored bank; a bank's
    views are its rows otherwise (mirror None)."""
    views = np.asarray(views, dtype=np.int64)
    return (views // 2, views % 2 == 1) if spec.mirror else (views, None)


def array_defs(spec: BankSpec) -> list[ArrayDef]:
    """All arrays of a bank, in a fixed order."""
    size = spec.image_size
    defs = [
        ArrayDef("image", "uint8", (3, size, size), sharded=True, per_image=spec.pixels == "image"),
        ArrayDef("key", "uint8", (KEY_BYTES,), sharded=False),
        ArrayDef("source_index", "int64", (), sharded=False),
        ArrayDef("draw", "int64", (), sharded=False),
        ArrayDef("flip", "int64", (), sharded=False),
        ArrayDef("seed", "int64", (), sharded=False),
        ArrayDef("ok", "bool", (), sharded=False),
    ]
    for level in spec.levels:
        codec = codec_for(level.codec, spec)
        for part, layout in codec.parts(level.stored).items():  # k channels when projected
            defs.append(
                ArrayDef(
                    feature_array_name(level.name, part),
                    layout.dtype,
                    layout.row_shape,
                    True,
                    level.name,
                    part,
                )
            )
    return defs


def _byte_codecs(adef: ArrayDef, spec: BankSpec, format_version: int) -> list[Any]:
    """The bytes-to-bytes codecs of a chunk: the compressor (sharded arrays), then crc32c (version >= 2)."""
    compressor = get_compressor(adef.compressor_name(spec))
    codecs = [compressor.zarr_codec(np.dtype(adef.dtype).itemsize)] if compressor else []
    if has_chunk_checksums(format_version):
        codecs.append(zarr.codecs.Crc32cCodec())
    return codecs


def create_arrays(
    group: zarr.Group,
    spec: BankSpec,
    format_version: int = FORMAT_VERSION,
    defs: list[ArrayDef] | None = None,
) -> None:
    """Create every array (``defs``, default the bank's own) at its final size (several writers never resize:
    zarr's ``resize`` races on ``zarr.json``)."""
    for adef in array_defs(spec) if defs is None else defs:
        shape = (adef.length(spec), *adef.row_shape)
        compressors = _byte_codecs(adef, spec, format_version) or None
        if adef.sharded:
            group.create_array(
                adef.path,
                shape=shape,
                chunks=(1, *adef.row_shape),
                shards=(adef.slots(spec), *adef.row_shape),
                dtype=adef.dtype,
                compressors=compressors,
                filters=None,
                fill_value=0,
            )
        else:
            # small per-row arrays: one chunk per shard, written whole by the shard's writer
            group.create_array(
                adef.path,
                shape=shape,
                chunks=(spec.shard_rows, *adef.row_shape),
                dtype=adef.dtype,
                compressors=compressors,
                filters=None,
                fill_value=0,
            )


def _little_bytes(codec: dict[str, Any]) -> bool:
    return codec.get("name") == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


def check_arrays(
    root: Path, spec: BankSpec, format_version: int = FORMAT_VERSION, defs: list[ArrayDef] | None = None
) -> None:
    """Raise :class:`BankError` unless every array exists with the shape, dtype and codecs this format writes.

    ``defs``: the arrays to check (default: the bank's own, :func:`array_defs`). Reads each array's ``zarr.json``
    directly (an invalid one is an error naming the file)."""
    problems = []
    for adef in array_defs(spec) if defs is None else defs:
        file = Path(root) / adef.path / "zarr.json"
        try:
            meta = read_json_file(file, f"metadata of array {adef.path}")
        except FileNotFoundError:
            problems.append(f"array {adef.path} is missing (no {file})")
            continue
        shape = (adef.length(spec), *adef.row_shape)
        try:
            dtype = np.dtype(meta["data_type"]) if isinstance(meta["data_type"], str) else None
            got_shape = tuple(meta["shape"])
        except (KeyError, TypeError) as exc:
            problems.append(f"{file} is not a Zarr v3 array's metadata ({exc!r})")
            continue
        if meta.get("node_type") != "array" or got_shape != shape or dtype != np.dtype(adef.dtype):
            problems.append(
                f"array {adef.path} is {meta.get('data_type')}{got_shape}, expected {adef.dtype}{shape}"
            )
            continue
        if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
            problems.append(
                f"array {adef.path}: chunk key encoding {meta.get('chunk_key_encoding')} is not the default"
            )
        expected_bytes = [c.to_dict()["name"] for c in _byte_codecs(adef, spec, format_version)]
        codecs = meta.get("codecs", [])
        if adef.sharded:
            ok = len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"
            conf = codecs[0].get("configuration", {}) if ok else {}
            ok = ok and tuple(conf.get("chunk_shape", ())) == (1, *adef.row_shape)
            ok = ok and conf.get("index_location", "end") == "end"
            ok = ok and [c["name"] for c in conf.get("index_codecs", [])] == ["bytes", "crc32c"]
            inner = conf.get("codecs", [])
            ok = ok and bool(inner) and _little_bytes(inner[0])
            ok = ok and [c.get("name") for c in inner[1:]] == expected_bytes
            if not ok:
                problems.append(
                    f"array {adef.path}: codecs {codecs} are not this format's shard layout "
                    f"(format v{format_version}, inner codecs bytes + {expected_bytes})"
                )
        else:
            ok = (
                bool(codecs)
                and _little_bytes(codecs[0])
                and [c.get("name") for c in codecs[1:]] == expected_bytes
            )
            if not ok:
                problems.append(
                    f"array {adef.path}: codecs {codecs} are not this format's (bytes + {expected_bytes})"
                )
    if problems:
        raise BankError(f"{root}: the bank's arrays do not match its spec:\n  " + "\n  ".join(problems))


# ---- writing files ---------------------------------------------------------------------------------------------
def _crc32c_bytes(data: Any) -> bytes:
    """The 4 little-endian bytes zarr's ``crc32c`` codec appends, of any C-contiguous buffer.

    The ``crc32c`` package, not the ``google_crc32c`` zarr-python uses: both take the CPU's crc32c instruction,
    but crc32c interleaves three streams. Measured on 3 MB buffers (2-core Xeon VM): 25.3 GB/s against 7.7 GB/s,
    against ~10 GB/s for the page-cache copy the reader checks it after (benchmarks: bench-bank)."""
    return crc32c.crc32c(data).to_bytes(4, "little")


def write_shard_file(
    path: Path,
    chunks: Any,
    nbytes: np.ndarray,
    shard_rows: int,
    *,
    checksum: bool = True,
    batch: DurableBatch | None = None,
) -> dict[str, int]:
    """Write one shard file: its inner chunks back to back (each followed by its crc32c when ``checksum``),
    absent chunks past the end, then the index and the index's crc32c.

    ``chunks``: the encoded chunks of rows 0..n-1 concatenated (a buffer); ``nbytes``: (n,) their sizes,
    n <= ``shard_rows`` (the bank's last shard may be short). The file is byte for byte what zarr-python writes
    for it (tests compare them). Why not zarr-python: it encodes every 1-row inner chunk through its asyncio
    codec pipeline in Python, hundreds of GIL-holding calls per shard; measured on a 2-core CPU, a thread writing
    shards that way slowed the teacher thread of the same process 1.7-2.1x even with a core to spare, while this
    is a few numpy calls, one crc32c per chunk and one ``writev``. The file is written under a temporary name,
    fsynced and renamed into place (see :func:`write_file`). Returns the file's :func:`file_checksum`, computed
    from the bytes written (no read-back).
    """
    n = len(nbytes)
    sizes = np.asarray(nbytes, dtype=np.uint64)
    view = memoryview(chunks).cast("B")
    if checksum:
        starts = (np.cumsum(sizes) - sizes).tolist()
        parts: list[Any] = []
        for start, size in zip(starts, sizes.tolist(), strict=True):
            chunk = view[start : start + size]
            parts += [chunk, _crc32c_bytes(chunk)]
        sizes = sizes + np.uint64(CHUNK_CRC_BYTES)
    else:
        parts = [view]
    index = np.full((shard_rows, 2), _ABSENT, dtype="<u8")
    index[:n, 0] = np.cumsum(sizes) - sizes
    index[:n, 1] = sizes
    index_bytes = index.tobytes()
    return write_file(path, [*parts, index_bytes, _crc32c_bytes(index_bytes)], batch=batch)


def write_sharded_rows(
    root: Path,
    adef: ArrayDef,
    shard: int,
    values: np.ndarray,
    spec: BankSpec,
    encoder: Any | None,
    *,
    checksum: bool,
    batch: DurableBatch,
) -> dict[str, dict[str, int]]:
    """One shard file of the sharded array ``adef``: each entry of ``values`` one inner chunk, compressed by
    ``encoder`` (a numcodecs codec, or None); returns ``{path inside the bank: checksum}``. The file goes into
    ``batch`` (durable at its commit)."""
    little = np.ascontiguousarray(values, dtype=np.dtype(adef.dtype).newbyteorder("<"))
    rows_bytes = little.reshape(len(little), -1).view(np.uint8)
    if encoder is None:
        chunks, nbytes = rows_bytes, np.full(len(rows_bytes), adef.row_nbytes)
    else:  # each row as its dtype: blosc's shuffle needs the item size
        encoded = [encoder.encode(row) for row in little]
        chunks, nbytes = b"".join(encoded), np.array([len(e) for e in encoded])
    file = adef.shard_file(root, shard)
    remove_stale_tmp(file)
    return {
        str(file.relative_to(root)): write_shard_file(
            file, chunks, nbytes, adef.slots(spec), checksum=checksum, batch=batch
        )
    }


def write_raw_chunk(
    path: Path,
    rows: np.ndarray,
    dtype: str,
    shard_rows: int,
    *,
    checksum: bool = True,
    batch: DurableBatch | None = None,
) -> dict[str, int]:
    """Write one regular chunk of ``shard_rows`` rows (the fill value 0 past a short last shard), followed by its
    crc32c when ``checksum``.

    The per-row arrays (keys, indices, flags) are one such chunk per shard; as with :func:`write_shard_file`,
    the bytes are zarr-python's, and writing them directly keeps the writer thread off the GIL. Returns the
    file's :func:`file_checksum`.
    """
    rows = np.asarray(rows, dtype=np.dtype(dtype).newbyteorder("<"))
    chunk = np.zeros((shard_rows, *rows.shape[1:]), dtype=rows.dtype)
    chunk[: len(rows)] = rows
    parts: list[Any] = [chunk.data]
    if checksum:
        parts.append(_crc32c_bytes(chunk))
    return write_file(path, parts, batch=batch)


def file_checksum(path: Path) -> dict[str, int]:
    """``{"nbytes", "crc32"}`` of a file (zlib.crc32: fast and in the standard library); done markers hold it."""
    crc, nbytes = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
            nbytes += len(block)
    return {"nbytes": nbytes, "crc32": crc}


def make_dirs(folder: Path, dirty_dirs: set[Path]) -> None:
    """``mkdir -p folder``; adds the parent of every folder it creates to ``dirty_dirs`` (their entries are new
    and need an fsync of that parent to survive a power loss)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        # a concurrent writer may make it first: its entry still needs syncing before OUR marker vouches for it
        created.mkdir(exist_ok=True)
        dirty_dirs.add(created.parent)


def fsync_dir(folder: Path) -> None:
    with _named(folder):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def host_key() -> str:
    """This machine and PID namespace: hostname, boot id and the PID namespace's inode. Two processes with the
    same key can test each other's liveness by PID; any other owner is judged by its lease or age only."""
    global _HOST_KEY
    if _HOST_KEY is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot = ""
        try:
            pid_ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            pid_ns = 0
        _HOST_KEY = f"{socket.gethostname()}/{boot}/{pid_ns}"
    return _HOST_KEY


_HOST_KEY: str | None = None


def host_tag() -> str:
    """8 hex digits of :func:`host_key`, for file names."""
    return hashlib.sha1(host_key().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (in this PID namespace). A zombie (killed, not yet reaped by its
    parent: what a SIGKILLed dask worker is for a moment) is not running."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:  # Linux: the state letter follows the parenthesised command name
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def owner_gone(tag: str, pid: int, mtime: float, max_age_s: float) -> bool:
    """Whether a file or folder left by (``tag``, ``pid``) at ``mtime`` belongs to nobody any more: its owner
    ran on this machine and is dead, or (another machine's, unknown) it is older than ``max_age_s``."""
    if tag == host_tag():
        return not pid_alive(pid)
    return time.time() - mtime > max_age_s


STALE_TMP_AGE_S = 3600.0
"""A temporary file of another machine's writer is left alone for this long (a live write takes seconds)."""


def tmp_name(path: Path) -> Path:
    """A temporary name beside ``path`` (same folder, so the final rename is atomic); unique per writer."""
    return path.with_name(f".{path.name}.tmp-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


class DurableBatch:
    """Files written under temporary names, then made durable together by :meth:`commit`.

    ``commit`` fsyncs every file, renames each into place, then fsyncs every folder that gained an entry (the
    renamed files' folders and the parents of folders created for them), the fsyncs of each step in parallel
    threads: the file system then batches them into few journal commits (measured 2-3x faster than one after
    another on ext4). Once ``commit`` returns, the files survive a power loss, so a done marker written after it
    never vouches for bytes that did not reach the disk. A rename makes each file whole-or-absent for readers
    and for a concurrent writer of the same file.
    """

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []
        self.dirs: set[Path] = set()

    def add(self, path: Path, parts: list[Any]) -> dict[str, int]:
        """Write ``parts`` (buffers) back to back to a temporary file beside ``path``; returns
        :func:`file_checksum` of the bytes, computed from the parts."""
        make_dirs(path.parent, self.dirs)
        tmp = tmp_name(path)
        views = [memoryview(part).cast("B") for part in parts]
        crc, nbytes = 0, 0
        for view in views:
            crc = zlib.crc32(view, crc)
            nbytes += len(view)
        self.files.append((tmp, path))
        with _named(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _writev_all(fd, views)
            finally:
                os.close(fd)
        return {"nbytes": nbytes, "crc32": crc}

    def commit(self) -> None:
        def sync(pair: tuple[Path, Path]) -> None:
            with _named(pair[1]):
                fsync_path(pair[0])

        _in_parallel(sync, self.files)
        for tmp, path in self.files:
            os.replace(tmp, path)
            self.dirs.add(path.parent)
        self.files = []
        _in_parallel(fsync_dir, sorted(self.dirs))
        self.dirs = set()

    def abort(self) -> None:
        """Remove the temporary files not committed."""
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        self.files = []


@contextlib.contextmanager
def _named(path: Path) -> Any:
    """OSErrors inside name ``path`` (writev and fsync errors carry no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


_FSYNC_POOL: tuple[int, Any] | None = None


def _in_parallel(fn: Any, items: list[Any]) -> None:
    """``fn(item)`` for every item, on a small per-process thread pool (fsync releases the GIL)."""
    global _FSYNC_POOL
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    if _FSYNC_POOL is None or _FSYNC_POOL[0] != os.getpid():  # a forked child gets its own pool
        from concurrent.futures import ThreadPoolExecutor

        _FSYNC_POOL = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="bank-fsync"))
    for _ in _FSYNC_POOL[1].map(fn, items):
        pass


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, parts: list[Any], *, batch: DurableBatch | None = None) -> dict[str, int]:
    """Write ``parts`` (buffers) back to back to ``path`` durably (see :class:`DurableBatch`): into ``batch``
    when given (durable at its ``commit``), else committed here. A full disk or quota is a :class:`BankError`
    naming ``path``. Returns :func:`file_checksum` of the result, computed from the parts."""
    own = batch is None
    batch = DurableBatch() if batch is None else batch
    try:
        checksum = batch.add(path, parts)
        if own:
            batch.commit()
    except OSError as exc:
        if own:
            batch.abort()
        if exc.errno in _NO_SPACE:
            raise no_space_error(exc.filename or path, exc) from exc
        raise
    return checksum


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """``os.writev`` until every byte is written (writev may write less than asked)."""
    pending = [v for v in views if len(v)]
    while pending:
        written = os.writev(fd, pending[:_IOV_MAX])
        while written and pending:
            if written >= len(pending[0]):
                written -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][written:]
                written = 0


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary files that a killed writer left beside ``path`` (see :func:`tmp_name`); a live writer's
    are kept."""
    folder = path.parent
    if not folder.is_dir():
        return
    for leftover in folder.glob(f".{path.name}.tmp-*"):
        fields = leftover.name.rsplit(".tmp-", 1)[1].split("-")
        try:
            tag, pid = fields[0], int(fields[1])
            mtime = leftover.stat().st_mtime
        except (IndexError, ValueError, OSError):
            continue
        if owner_gone(tag, pid, mtime, STALE_TMP_AGE_S):
            leftover.unlink(missing_ok=True)


# ---- reading ---------------------------------------------------------------------------------------------------
def read_row_chunk(
    root: Path,
    adef: ArrayDef,
    shard: int,
    shard_rows: int,
    *,
    checksum: bool,
    marker: dict[str, Any],
    verify: bool = True,
    rows: range | None = None,
) -> np.ndarray:
    """One per-row array's chunk of ``shard``: the ``(shard_rows, *row_shape)`` rows.

    When ``verify``, the file is checked against its done marker (size and crc32 of the file) and, when
    ``checksum`` (format v2), against the chunk's own crc32c; a mismatch is a :class:`BankError` naming the
    shard, its rows, the file and the repair step. Unverified, a damaged file reads as zeros."""
    file = adef.shard_file(root, shard)
    rel = str(file.relative_to(root))
    version = 2 if checksum else 1
    body = shard_rows * adef.row_nbytes
    stored = body + (CHUNK_CRC_BYTES if checksum else 0)
    try:
        data = file.read_bytes()
    except FileNotFoundError as exc:
        if not verify:
            data = b""
        else:
            raise BankError(
                f"{root}: shard {shard} file {rel} is missing. {repair_hint(root, shard, version)}"
            ) from exc
    bad = None
    if verify:
        expected = marker.get("files", {}).get(rel)
        if expected is not None and (
            len(data) != expected["nbytes"] or zlib.crc32(data) != expected["crc32"]
        ):
            bad = f"does not match the size and crc32 its done marker records ({len(data)} bytes now)"
        elif len(data) != stored:
            bad = f"holds {len(data)} bytes, expected {stored}"
        elif checksum and _crc32c_bytes(memoryview(data)[:body]) != data[body:]:
            bad = "fails its crc32c checksum"
    if bad:
        rows = rows if rows is not None else range(shard * shard_rows, (shard + 1) * shard_rows)
        raise BankError(
            f"{root}: shard {shard} (rows {rows.start}..{rows.stop - 1}) file {rel} {bad}: "
            f"the file is corrupt. {repair_hint(root, shard, version)}"
        )
    if len(data) < body:
        data = bytes(body)
    dtype = np.dtype(adef.dtype).newbyteorder("<")
    return np.frombuffer(data, dtype=dtype, count=body // dtype.itemsize).reshape(shard_rows, *adef.row_shape)


class ShardFile:
    """Rows of one shard file of one array, read through the shard index (no zarr-python call).

    Rows are read with ``os.preadv`` straight into their final slots of the caller's batch buffer (no
    intermediate copy): measured faster than copying out of an ``np.memmap`` (page-fault bound). Requested rows
    whose chunks lie back to back in the file are read by ONE ``preadv`` scattering into their (not necessarily
    adjacent) output slots, so a contiguous row range costs one syscall per array and shard. With ``checksum``
    (format version >= 2) each chunk's trailing crc32c is scattered into a small side buffer by the same
    ``preadv`` and compared with the crc32c of the bytes read as ``check`` says (:data:`ChunkCheck`); ``checked``
    (one byte per chunk of this shard, kept by the caller across re-opens) records the chunks this process has
    checked, for ``check="first"``. A small file is read whole at open (:data:`SMALL_SHARD_FILE`); its bytes do
    not come from the file again until it is re-opened, so under ``always`` each of its chunks is checked once per
    open.
    """

    def __init__(
        self,
        path: Path,
        adef: ArrayDef,
        shard_rows: int,
        decoder: Any | None,
        *,
        checksum: bool = False,
        check: ChunkCheck = "always",
        checked: bytearray | memoryview | None = None,
        shard: int = -1,
        root: Path | None = None,
    ) -> None:
        self.adef, self.decoder, self.path = adef, decoder, path
        self.shard, self.root, self.shard_rows = shard, root, shard_rows
        self.checksum = checksum
        self.check: ChunkCheck = check if checksum else "never"
        self._checked = checked if checked is not None else bytearray(shard_rows)
        self._fd = -1
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BankError(f"shard file {path} is missing. {self._hint()}") from exc
        size = os.fstat(self._fd).st_size
        index_nbytes = 16 * shard_rows + _INDEX_CRC_BYTES
        if size < index_nbytes:
            self.close()
            raise BankError(f"shard file {path} is truncated ({size} bytes). {self._hint()}")
        raw = os.pread(self._fd, index_nbytes, size - index_nbytes)
        if _crc32c_bytes(memoryview(raw)[:-_INDEX_CRC_BYTES]) != raw[-_INDEX_CRC_BYTES:]:
            self.close()
            raise BankError(f"{self._where()}: the shard index fails its crc32c checksum. {self._hint()}")
        # (shard_rows, 2) uint64 little-endian (offset, nbytes); as Python lists too, for the hot path
        self.index = np.frombuffer(raw[:-_INDEX_CRC_BYTES], dtype="<u8").reshape(-1, 2)
        self._offsets: list[int] = self.index[:, 0].tolist()
        self._sizes: list[int] = self.index[:, 1].tolist()
        self._table: np.ndarray | None = None
        """A small file's stored chunks, ``(present, stored bytes)``, read whole at open."""
        if decoder is None and size <= SMALL_SHARD_FILE:
            self._table = self._read_whole()
        if self._table is not None and self.check == "always":  # once per open: see the class docstring
            self.check, self._checked = "first", bytearray(shard_rows)

    def _read_whole(self) -> np.ndarray | None:
        """A file whose chunks are stored raw, back to back from offset 0 in slot order (what the writer writes;
        absent chunks only past the last written one), read whole: ``(present, stored)`` uint8. None for any
        other layout (read chunk by chunk)."""
        stored = self.adef.row_nbytes + (CHUNK_CRC_BYTES if self.checksum else 0)
        present = sum(1 for offset in self._offsets if offset != _ABSENT_INT)
        regular = all(
            self._offsets[i] == i * stored and self._sizes[i] == stored for i in range(present)
        ) and all(self._sizes[i] == _ABSENT_INT for i in range(present, self.shard_rows))
        if not regular:
            return None
        data = os.pread(self._fd, present * stored, 0)
        if len(data) != present * stored:
            self._mis_sized(len(data) // stored, len(data) % stored, stored)
        self.close()  # every byte the file can give is in memory
        return np.frombuffer(data, dtype=np.uint8).reshape(present, stored)

    def _hint(self) -> str:
        if self.root is None or self.shard < 0:
            return "Re-run encode to rewrite its shard."
        return repair_hint(self.root, self.shard, 2 if self.checksum else 1, labels=self.adef.per_view)

    def _where(self) -> str:
        rel = self.path.relative_to(self.root) if self.root is not None else self.path
        return f"{self.root}: shard {self.shard} file {rel}" if self.root is not None else f"{self.path}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _read_from_table(self, rows: list[int], out_bytes: np.ndarray, outs: list[int]) -> None:
        """:meth:`read_into` for a small file held in memory: each chunk checked when first used, one gather."""
        table, row_nbytes = self._table, self.adef.row_nbytes
        assert table is not None
        present = len(table)
        to_check = self._to_check(rows)
        if to_check is not None:
            for local, check in zip(rows, to_check, strict=True):
                if (
                    check
                    and local < present
                    and _crc32c_bytes(table[local, :row_nbytes]) != table[local, row_nbytes:].tobytes()
                ):
                    self._corrupt(local)
            self._mark_checked(rows, to_check)
        if present == self.shard_rows:  # no absent chunk (every shard but a short last one)
            out_bytes[outs] = table[rows, :row_nbytes]
            return
        for local, slot in zip(rows, outs, strict=True):
            out_bytes[slot] = table[local, :row_nbytes] if local < present else 0  # absent: the fill value

    def _to_check(self, rows: list[int]) -> list[bool] | None:
        """Per chunk of this read, whether it is checked now; None when none is (``never``; ``first`` once each
        of them was checked: the steady state of training, so its read skips the per-chunk loop). One list
        comprehension over the per-process bytes, not a call per chunk (that was 11 % of an int4 + PCA batch)."""
        if self.check == "never":
            return None
        if self.check == "always":
            return [True] * len(rows)
        checked = self._checked
        flags = [not checked[local] for local in rows]
        return flags if True in flags else None

    def _mark_checked(self, rows: list[int], to_check: list[bool]) -> None:
        """``check="first"``: the chunks this read checked are checked for the process; marked only after every
        check passed, so a chunk that failed is checked again by the next read (a retry cannot skip it)."""
        if self.check == "first":
            for local, check in zip(rows, to_check, strict=True):
                if check:
                    self._checked[local] = 1

    def read_into(self, rows: list[int], out_bytes: np.ndarray, outs: list[int]) -> None:
        """Copy chunks ``rows`` (positions inside the shard) into ``out_bytes[outs[j]]``.

        ``out_bytes``: (n, row_nbytes) uint8 rows of a C-contiguous buffer. Plain Python over the few rows of a
        batch, on lists (the caller's, made once for every array; the index's, made at open): numpy's per-call
        overhead (a dozen small calls per array and shard) was 30 % of an int4 batch's read in the profile.
        """
        row_nbytes = self.adef.row_nbytes
        trailer = CHUNK_CRC_BYTES if self.checksum else 0
        stored = row_nbytes + trailer
        if self._table is not None:  # a small file, in memory since open: one gather
            self._read_from_table(rows, out_bytes, outs)
            return
        offsets, sizes = self._offsets, self._sizes
        to_check = self._to_check(rows)
        # 1. sort the chunks: absent ones (never written) get the fill value, stored raw ones are read in runs
        plain: list[tuple[int, int]] = []  # (file offset, j)
        other: list[int] = []
        for j, local in enumerate(rows):
            offset, size = offsets[local], sizes[local]
            if offset == _ABSENT_INT and size == _ABSENT_INT:
                out_bytes[outs[j]] = 0
            elif self.decoder is None and size == stored:
                plain.append((offset, j))
            else:
                other.append(j)
        # 2. stored raw chunks: runs of back-to-back chunks, one preadv per run (<= IOV_MAX buffers), each chunk's
        #    crc32c scattered into a side buffer by the same call
        if plain:
            plain.sort()
            per_run = _IOV_MAX // 2 if trailer else _IOV_MAX
            crcs = memoryview(bytearray(trailer * len(plain)))
            start = 0
            for k in range(1, len(plain) + 1):
                if k < len(plain) and plain[k][0] == plain[k - 1][0] + stored and k - start < per_run:
                    continue  # chunk k continues the run
                buffers: list[Any] = []
                for i in range(start, k):
                    buffers.append(out_bytes[outs[plain[i][1]]])
                    if trailer:
                        buffers.append(crcs[4 * i : 4 * i + 4])
                got = os.preadv(self._fd, buffers, plain[start][0])
                if got != (k - start) * stored:
                    self._mis_sized(rows[plain[start][1]], got, (k - start) * stored)
                start = k
            if to_check is not None:
                for i, (_offset, j) in enumerate(plain):
                    if to_check[j] and _crc32c_bytes(out_bytes[outs[j]]) != crcs[4 * i : 4 * i + 4]:
                        self._corrupt(rows[j])
        # 3. compressed (or mis-sized) chunks: read, check, decode, copy
        for j in other:
            local = rows[j]
            data = os.pread(self._fd, sizes[local], offsets[local])
            if trailer:
                if len(data) < trailer:
                    self._mis_sized(local, len(data), stored)
                body = memoryview(data)[:-trailer]
                if to_check is not None and to_check[j] and _crc32c_bytes(body) != data[-trailer:]:
                    self._corrupt(local)
                data = body
            if self.decoder is not None:
                data = self.decoder.decode(data)
            if len(data) != row_nbytes:
                self._mis_sized(local, len(data), row_nbytes)
            out_bytes[outs[j]] = np.frombuffer(data, dtype=np.uint8)
        if to_check is not None:
            self._mark_checked(rows, to_check)

    def _row(self, local: int) -> str:
        what = "image" if self.adef.per_image else "soft labels of view" if self.adef.per_view else "row"
        if self.shard < 0:
            return f"local {what} {local}"
        return f"{what} {self.shard * self.shard_rows + local}"

    def _mis_sized(self, local: int, got: int, expected: int) -> None:
        raise BankError(
            f"{self._where()}: {self._row(local)} holds {got} bytes, expected {expected}; the shard is "
            f"corrupt. {self._hint()}"
        )

    def _corrupt(self, local: int) -> None:
        raise BankError(
            f"{self._where()}: {self._row(local)} fails its crc32c checksum; the chunk is corrupt. {self._hint()}"
        )


class ShardFileCache:
    """Per-process LRU of open :class:`ShardFile` s (re-created after fork: descriptors are per process).

    Holds ``shards_open`` shards of every sharded array: the sampler's block shuffle keeps a batch inside a
    window of a few shards, and an LRU smaller than (window shards x arrays) would re-open and re-read the index
    of every file on every batch (the profile showed 156 opens for 260 lookups at 64 slots). For
    ``check="first"`` it keeps, per array, one byte per chunk that this process has checked, across re-opens
    (one byte per row and array: 2.6 MB per array for ImageNet's 2.56M rows).
    """

    def __init__(
        self,
        root: Path,
        spec: BankSpec,
        shards_open: int = 16,
        *,
        checksum: bool = False,
        check: ChunkCheck = "always",
        extra_arrays: int = 0,
    ) -> None:
        """``extra_arrays``: sharded arrays beside the bank's own (the soft labels') kept open as well."""
        self.root, self.spec = root, spec
        self.checksum, self.check = checksum, check
        self.capacity = shards_open * (sum(1 for d in array_defs(spec) if d.sharded) + extra_arrays)
        self._files: OrderedDict[tuple[str, int], ShardFile] = OrderedDict()
        self._checked: dict[str, bytearray] = {}
        self._pid = os.getpid()

    def get(self, adef: ArrayDef, shard: int) -> ShardFile:
        if self._pid != os.getpid():
            self._files.clear()  # the parent's descriptors stay the parent's, and so do its checks
            self._checked.clear()
            self._pid = os.getpid()
        key = (adef.path, shard)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        compressor = get_compressor(adef.compressor_name(self.spec))
        slots = adef.slots(self.spec)
        if adef.path not in self._checked:
            self._checked[adef.path] = bytearray(slots * self.spec.num_shards)
        shard_file = ShardFile(
            adef.shard_file(self.root, shard),
            adef,
            slots,
            compressor.chunk_decoder() if compressor else None,
            checksum=self.checksum,
            check=self.check,
            checked=memoryview(self._checked[adef.path])[shard * slots : (shard + 1) * slots],
            shard=shard,
            root=self.root,
        )
        self._files[key] = shard_file
        if len(self._files) > self.capacity:
            self._files.popitem(last=False)[1].close()
        return shard_file
