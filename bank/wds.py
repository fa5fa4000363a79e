"""WebDataset export of a bank and a streaming reader of it (for training from object storage).

Entries are ``.npy`` only (no ``.pyd``/``.pth``: those mean pickle). One sample per bank row, keyed by its
zero-padded row number: ``image.npy`` (uint8 3xHxW), ``<level>.<part>.npy`` (the encoded payload, decoded later
on the GPU by ``decode_targets``) and ``meta.npy`` (int64 [row, source_index, draw, flip, seed, ok]).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from bank.dataset import collate_rows
from bank.reader import Bank

META_FIELDS = ("row", "source_index", "draw", "flip", "seed", "ok")


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def export_wds(
    bank_path: str | Path, out_dir: str | Path, *, rows_per_tar: int = 1024, progress: bool = True
) -> list[Path]:
    """Write the bank's OK rows as ``out_dir/bank-NNNNNN.tar``; returns the tar paths."""
    bank = Bank.open(bank_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / "bank-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=rows_per_tar, verbose=0) as sink:
        for shard in tqdm(range(bank.spec.num_shards), desc="export-wds", disable=not progress):
            batch = bank.read_rows(bank.spec.shard_range(shard))
            for i, row in enumerate(batch["row"]):
                if not batch["ok"][i]:
                    continue
                sample = {"__key__": f"{int(row):010d}", "image.npy": _npy(batch["image"][i])}
                for level, parts in batch["targets"].items():
                    for part, values in parts.items():
                        sample[f"{level}.{part}.npy"] = _npy(values[i])
                sample["meta.npy"] = _npy(np.array([batch[f][i] for f in META_FIELDS], dtype=np.int64))
                sink.write(sample)
    return sorted(out_dir.glob("bank-*.tar"))


def _decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw tar entries -> the sample layout of ``BankTrainSet.__getitem__`` (only .npy, never unpickled)."""
    out: dict[str, Any] = {"targets": {}}
    for name, raw in sample.items():
        if name.startswith("__"):
            continue
        if not name.endswith(".npy"):
            raise ValueError(
                f"unexpected entry {name!r} in a bank WebDataset sample; only .npy entries are read"
            )
        array = torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
        stem = name[: -len(".npy")]
        if stem == "image":
            out["image"] = array
        elif stem == "meta":
            out.update({f: array[j] for j, f in enumerate(META_FIELDS)})
            out["ok"] = out["ok"].bool()
        else:
            level, part = stem.split(".")
            out["targets"].setdefault(level, {})[part] = array
    return out


def wds_stream(urls: str | list[str], batch_size: int, *, shuffle: int = 0, seed: int = 0) -> wds.WebDataset:
    """Streaming batches of a WebDataset export: tars split by node (DDP rank) and by DataLoader worker.

    Iterate directly or wrap in ``DataLoader(stream, batch_size=None, num_workers=N)``; batches have the
    :class:`bank.BankTrainSet` layout. For exact epochs over ``ranks x workers``, export a tar count divisible
    by it (webdataset's ``split_by_node`` hands whole tars out).
    """
    stream = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        shardshuffle=False,
        empty_check=False,
    )
    if shuffle:
        stream = stream.shuffle(shuffle, seed=seed)
    return stream.map(_decode_sample).batched(batch_size, collation_fn=collate_rows, partial=True)


def iter_rows(urls: str | list[str]) -> Iterator[dict[str, Any]]:
    """Single samples (tests, tools)."""
    return iter(wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=False).map(_decode_sample))
