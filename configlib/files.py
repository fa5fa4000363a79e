"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

One implementation for every small file the project writes beside its artifacts (resolved configs, run records,
summaries, results). Large binary state has its own writer (``training.checkpoint`` for ``torch.save``; the bank's
shard writer for data files).
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``<path>.tmp`` in the same folder, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))
