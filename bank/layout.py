"""The bank's Zarr v3 arrays, and a direct reader of the spec-defined shard file layout.

Every big array (input pixels, each codec part of each level) has chunk = one row and shard = ``shard_rows``
rows, so one shard is one file per array. The Zarr v3 sharding codec specifies that file: the encoded inner
chunks, then an index of ``(offset, nbytes)`` uint64 little-endian pairs (one per inner chunk, C order,
``2**64 - 1`` twice for an absent chunk) and a 4-byte crc32c of the index. :class:`ShardFile` reads rows straight
out of that layout with ``os.preadv``: zarr-python costs ~1.6 ms per ``a[i]`` call (storage.md), which caps
a reader at ~600 rows/s per process, while reading chunks by offset from the page cache runs near the raw file-read speed. zarr-python
stays the writer and the validator (``bank verify`` compares the two).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bank.codecs import get_compressor, make_codec
from bank.spec import KEY_BYTES, BankError, BankSpec, feature_array_name

_ABSENT = np.uint64(2**64 - 1)
_INDEX_CRC_BYTES = 4


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


class ShardFile:
    """Rows of one shard file of one array, read through the shard index (no zarr-python call).

    Each row's chunk is read with one ``os.preadv`` straight into the caller's output buffer: measured faster
    than copying out of an ``np.memmap`` (page-fault bound) and it needs no intermediate copy.
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

    def read_into(self, local_rows: np.ndarray, out: np.ndarray) -> None:
        """Copy rows ``local_rows`` (positions inside the shard) into ``out`` (len(local_rows), *row_shape),
        a C-contiguous buffer of the array's dtype."""
        row_nbytes = self.adef.row_nbytes
        out_bytes = out.reshape(len(local_rows), -1).view(np.uint8)
        for j, local in enumerate(local_rows):
            offset, nbytes = self.index[local]
            if offset == _ABSENT and nbytes == _ABSENT:
                out_bytes[j] = 0  # chunk never written: fill value
                continue
            if self.decoder is None and nbytes == row_nbytes:
                got = os.preadv(self._fd, [out_bytes[j]], int(offset))
            else:
                raw = os.pread(self._fd, int(nbytes), int(offset))
                data = self.decoder.decode(raw) if self.decoder is not None else raw
                got = len(data)
                if got == row_nbytes:
                    out_bytes[j] = np.frombuffer(data, dtype=np.uint8)
            if got != row_nbytes:
                raise BankError(
                    f"{self.path}: row {local} holds {got} bytes, expected {row_nbytes}; the shard is corrupt "
                    "(run `dreamteacher bank verify`)"
                )


class ShardFileCache:
    """Per-process LRU of open :class:`ShardFile` s (re-created after fork: descriptors are per process)."""

    def __init__(self, root: Path, spec: BankSpec, capacity: int = 64) -> None:
        self.root, self.spec, self.capacity = root, spec, capacity
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
