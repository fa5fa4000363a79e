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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere), so that figures taken on
    different machines of one kind (two 2-core VMs: an Intel Xeon one day, an AMD EPYC the next) say which."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
