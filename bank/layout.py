"""The bank's Zarr v3 arrays, and a direct reader and writer of the spec-defined shard file layout.

Every big array (input pixels, each codec part of each level) has chunk = one row and shard = ``shard_rows``
rows, so one shard is one file per array. The Zarr v3 sharding codec specifies that file: the encoded inner
chunks, then an index of ``(offset, nbytes)`` uint64 little-endian pairs (one per inner chunk, C order,
``2**64 - 1`` twice for an absent chunk) and a 4-byte crc32c of the index. :class:`ShardFile` reads rows straight
out of that layout with ``os.preadv``: zarr-python costs ~1.6 ms per ``a[i]`` call (storage.md), which caps
a reader at ~600 rows/s per process, while reading chunks by offset from the page cache runs near the raw
file-read speed. :func:`write_shard_file` and :func:`write_raw_chunk` write the shards and the small per-row
arrays' chunks the same way (see their docstrings for why). zarr-python creates the arrays and validates
(``bank verify`` compares the two readers; tests compare the written bytes with zarr-python's).
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from bank.codecs import get_compressor, make_codec
from bank.spec import KEY_BYTES, BankError, BankSpec, feature_array_name

_ABSENT = np.uint64(2**64 - 1)
_INDEX_CRC_BYTES = 4
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


@dataclass(frozen=True)
class ArrayDef:
    """One array of the bank: zarr path, numpy dtype, per-row shape; ``sharded`` arrays use the shard layout."""

    path: str
    dtype: str
    row_shape: tuple[int, ...]
    sharded: bool
    level: str = ""
    part: str = ""

    @property
    def row_nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.row_shape, dtype=np.int64)))

    def shard_file(self, root: Path, shard: int) -> Path:
        """File of ``shard`` under the default chunk-key encoding (``c/<shard>/0/...``)."""
        return root / self.path / "c" / "/".join([str(shard)] + ["0"] * len(self.row_shape))


def array_defs(spec: BankSpec) -> list[ArrayDef]:
    """All arrays of a bank, in a fixed order."""
    size = spec.image_size
    defs = [
        ArrayDef("image", "uint8", (3, size, size), sharded=True),
        ArrayDef("key", "uint8", (KEY_BYTES,), sharded=False),
        ArrayDef("source_index", "int64", (), sharded=False),
        ArrayDef("draw", "int64", (), sharded=False),
        ArrayDef("flip", "int64", (), sharded=False),
        ArrayDef("seed", "int64", (), sharded=False),
        ArrayDef("ok", "bool", (), sharded=False),
    ]
    for level in spec.levels:
        codec = make_codec(level.codec, bitround_keepbits=spec.bitround_keepbits)
        for part, layout in codec.parts(level).items():
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


def create_arrays(group: zarr.Group, spec: BankSpec) -> None:
    """Create every array at its final size (several writers never resize; storage.md)."""
    compressor = get_compressor(spec.compressor)
    for adef in array_defs(spec):
        shape = (spec.num_rows, *adef.row_shape)
        if adef.sharded:
            compressors = [compressor.zarr_codec(np.dtype(adef.dtype).itemsize)] if compressor else None
            group.create_array(
                adef.path,
                shape=shape,
                chunks=(1, *adef.row_shape),
                shards=(spec.shard_rows, *adef.row_shape),
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
                compressors=None,
                filters=None,
                fill_value=0,
            )


def check_arrays(group: zarr.Group, spec: BankSpec) -> None:
    """Raise :class:`BankError` unless every array exists with the shape, dtype and codecs this format writes."""
    problems = []
    for adef in array_defs(spec):
        try:
            arr = group[adef.path]
        except KeyError:
            problems.append(f"array {adef.path} is missing")
            continue
        shape = (spec.num_rows, *adef.row_shape)
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(adef.dtype):
            problems.append(
                f"array {adef.path} is {arr.dtype}{tuple(arr.shape)}, expected {adef.dtype}{shape}"
            )
            continue
        meta = arr.metadata.to_dict()
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            problems.append(
                f"array {adef.path}: chunk key encoding {meta['chunk_key_encoding']} is not the default"
            )
        if adef.sharded:
            codecs = meta["codecs"]
            ok = len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed"
            conf = codecs[0].get("configuration", {}) if ok else {}
            ok = ok and tuple(conf.get("chunk_shape", ())) == (1, *adef.row_shape)
            ok = ok and conf.get("index_location", "end") == "end"
            ok = ok and [c["name"] for c in conf.get("index_codecs", [])] == ["bytes", "crc32c"]
            inner = conf.get("codecs", [])
            ok = ok and bool(inner) and inner[0]["name"] == "bytes"
            ok = ok and inner[0].get("configuration", {}).get("endian", "little") == "little"
            if not ok:
                problems.append(f"array {adef.path}: codecs {codecs} are not this format's shard layout")
    if problems:
        raise BankError("the bank's arrays do not match its spec:\n  " + "\n  ".join(problems))


def write_shard_file(path: Path, chunks: Any, nbytes: np.ndarray, shard_rows: int) -> dict[str, int]:
    """Write one shard file: its inner chunks back to back, absent chunks past the end, then the index.

    ``chunks``: the encoded chunks of rows 0..n-1 concatenated (a buffer); ``nbytes``: (n,) their sizes,
    n <= ``shard_rows`` (the bank's last shard may be short). The file is byte for byte what zarr-python writes
    for it (tests compare them). Why not zarr-python: it encodes every 1-row inner chunk through its asyncio
    codec pipeline in Python, hundreds of GIL-holding calls per shard; measured on a 2-core CPU, a thread writing
    shards that way slowed the teacher thread of the same process 1.7-2.1x even with a core to spare, while this
    is a few numpy calls and one ``write``. Returns the file's :func:`file_checksum`, computed from the bytes
    written (no read-back).
    """
    n = len(nbytes)
    sizes = np.asarray(nbytes, dtype=np.uint64)
    index = np.full((shard_rows, 2), _ABSENT, dtype="<u8")
    index[:n, 0] = np.cumsum(sizes) - sizes
    index[:n, 1] = sizes
    index_bytes = index.tobytes()
    crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    return _write_file(path, [chunks, index_bytes, crc])


def write_raw_chunk(path: Path, rows: np.ndarray, dtype: str, shard_rows: int) -> dict[str, int]:
    """Write one uncompressed regular chunk of ``shard_rows`` rows (the fill value 0 past a short last shard).

    The per-row arrays (keys, indices, flags) are one such chunk per shard; as with :func:`write_shard_file`,
    the bytes are zarr-python's, and writing them directly keeps the writer thread off the GIL. Returns the
    file's :func:`file_checksum`.
    """
    rows = np.asarray(rows, dtype=np.dtype(dtype).newbyteorder("<"))
    chunk = np.zeros((shard_rows, *rows.shape[1:]), dtype=rows.dtype)
    chunk[: len(rows)] = rows
    return _write_file(path, [chunk.data])


def file_checksum(path: Path) -> dict[str, int]:
    """``{"nbytes", "crc32"}`` of a file (zlib.crc32: fast and in the standard library); done markers hold it."""
    crc, nbytes = 0, 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
            nbytes += len(block)
    return {"nbytes": nbytes, "crc32": crc}


def _write_file(path: Path, parts: list[Any]) -> dict[str, int]:
    """Write ``parts`` (buffers) back to back; returns :func:`file_checksum` of the result from the parts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    crc, nbytes = 0, 0
    with open(path, "wb") as f:
        for part in parts:
            view = memoryview(part).cast("B")
            f.write(view)
            crc = zlib.crc32(view, crc)
            nbytes += len(view)
    return {"nbytes": nbytes, "crc32": crc}


class ShardFile:
    """Rows of one shard file of one array, read through the shard index (no zarr-python call).

    Rows are read with ``os.preadv`` straight into their final slots of the caller's batch buffer (no
    intermediate copy): measured faster than copying out of an ``np.memmap`` (page-fault bound). Requested rows
    whose chunks lie back to back in the file are read by ONE ``preadv`` scattering into their (not necessarily
    adjacent) output slots, so a contiguous row range costs one syscall per array and shard.
    """

    def __init__(self, path: Path, adef: ArrayDef, shard_rows: int, decoder: Any | None) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise BankError(f"shard file {path} is missing; re-run encode to rewrite its shard") from exc
        size = os.fstat(self._fd).st_size
        index_nbytes = 16 * shard_rows + _INDEX_CRC_BYTES
        if size < index_nbytes:
            os.close(self._fd)
            raise BankError(f"shard file {path} is truncated ({size} bytes); re-run encode")
        raw_index = os.pread(self._fd, 16 * shard_rows, size - index_nbytes)
        # (shard_rows, 2) uint64 little-endian (offset, nbytes)
        self.index = np.frombuffer(raw_index, dtype="<u8").reshape(-1, 2)
        self.adef, self.decoder, self.path = adef, decoder, path

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def read_into(
        self, local_rows: np.ndarray, out_bytes: np.ndarray, slots: np.ndarray | None = None
    ) -> None:
        """Copy rows ``local_rows`` (positions inside the shard) into ``out_bytes[slots[j]]``.

        ``out_bytes``: (n, row_nbytes) uint8 rows of a C-contiguous buffer; ``slots`` defaults to ``0..len-1``.
        """
        row_nbytes = self.adef.row_nbytes
        local_rows = np.asarray(local_rows, dtype=np.int64)
        slots = np.arange(len(local_rows)) if slots is None else np.asarray(slots, dtype=np.int64)
        entries = self.index[local_rows]  # (m, 2) offset, nbytes
        offsets, sizes = entries[:, 0], entries[:, 1]
        absent = (offsets == _ABSENT) & (sizes == _ABSENT)
        plain = ~absent & (sizes == row_nbytes) if self.decoder is None else np.zeros_like(absent)
        # 1. absent chunks (never written): the fill value
        if absent.any():
            for j in np.flatnonzero(absent):
                out_bytes[slots[j]] = 0
        # 2. stored raw chunks: runs of back-to-back chunks, one preadv per run (<= IOV_MAX buffers). Plain
        #    Python over the few rows of a batch: numpy's per-call overhead dominated here in the profile.
        raw = np.flatnonzero(plain)
        if len(raw):
            raw = raw[np.argsort(offsets[raw], kind="stable")]
            offs, outs = offsets[raw].tolist(), slots[raw].tolist()
            start = 0
            for k in range(1, len(offs) + 1):
                if k < len(offs) and offs[k] == offs[k - 1] + row_nbytes and k - start < _IOV_MAX:
                    continue  # chunk k continues the run
                got = os.preadv(self._fd, [out_bytes[s] for s in outs[start:k]], offs[start])
                if got != (k - start) * row_nbytes:
                    self._corrupt(int(local_rows[raw[start]]), got, (k - start) * row_nbytes)
                start = k
        # 3. compressed (or mis-sized) chunks: read, decode, copy
        if len(raw) < len(local_rows):
            for j in np.flatnonzero(~absent & ~plain):
                data = os.pread(self._fd, int(sizes[j]), int(offsets[j]))
                if self.decoder is not None:
                    data = self.decoder.decode(data)
                if len(data) != row_nbytes:
                    self._corrupt(int(local_rows[j]), len(data), row_nbytes)
                out_bytes[slots[j]] = np.frombuffer(data, dtype=np.uint8)

    def _corrupt(self, local: int, got: int, expected: int) -> None:
        raise BankError(
            f"{self.path}: row {local} holds {got} bytes, expected {expected}; the shard is corrupt "
            "(run `dreamteacher bank verify`)"
        )


class ShardFileCache:
    """Per-process LRU of open :class:`ShardFile` s (re-created after fork: descriptors are per process).

    Holds ``shards_open`` shards of every sharded array: the sampler's block shuffle keeps a batch inside a
    window of a few shards, and an LRU smaller than (window shards x arrays) would re-open and re-read the index
    of every file on every batch (the profile showed 156 opens for 260 lookups at 64 slots).
    """

    def __init__(self, root: Path, spec: BankSpec, shards_open: int = 16) -> None:
        self.root, self.spec = root, spec
        self.capacity = shards_open * sum(1 for d in array_defs(spec) if d.sharded)
        compressor = get_compressor(spec.compressor)
        self._decoder_factory = compressor.chunk_decoder if compressor else None
        self._files: OrderedDict[tuple[str, int], ShardFile] = OrderedDict()
        self._pid = os.getpid()

    def get(self, adef: ArrayDef, shard: int) -> ShardFile:
        if self._pid != os.getpid():
            self._files.clear()  # the parent's descriptors stay the parent's
            self._pid = os.getpid()
        key = (adef.path, shard)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        decoder = self._decoder_factory() if self._decoder_factory else None
        shard_file = ShardFile(adef.shard_file(self.root, shard), adef, self.spec.shard_rows, decoder)
        self._files[key] = shard_file
        if len(self._files) > self.capacity:
            self._files.popitem(last=False)[1].close()
        return shard_file
