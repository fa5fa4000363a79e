"""Timing on any device: the benchmarks' one clock."""

from __future__ import annotations

import time
from typing import Any


def synced(device: Any) -> float:
    """``time.perf_counter()`` once ``device``'s queued work is done (CUDA runs asynchronously)."""
    import torch  # here, not at import: gpu-check imports this module before it has checked its torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
