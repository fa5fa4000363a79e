"""Process setup shared by every training loop (distill, finetune, teacher training): device, torchrun/DDP,
autocast, seeds. One place decides which device a rank uses and how it joins the process group."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    """Where this process runs and who it is among the ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp: bool = False
    """Autocast on (only ever True on CUDA: CPU runs float32)."""
    amp_dtype: torch.dtype = torch.bfloat16
    """bf16 (no loss scaler needed) or fp16 (needs a GradScaler: :attr:`needs_grad_scaler`)."""
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sync_batchnorm(self) -> bool:
        """Whether batch-norm statistics are synchronised across ranks: under DDP on CUDA only (torch's
        SyncBatchNorm has no CPU kernel; a CPU multi-process run keeps per-rank statistics)."""
        return self.distributed and self.device.type == "cuda"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 autocast underflows small gradients without loss scaling; bf16 has float32's range."""
        return self.amp and self.amp_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """``amp_dtype`` autocast on CUDA when enabled; a no-op context on CPU (tests run float32)."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each value over the ranks (one all_reduce); the values themselves single-process."""
        if not self.distributed:
            return values
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP around ``model`` under torchrun, ``model`` itself otherwise."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def resolve_device(name: str, key: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's CUDA device when available, else CPU; anything else is passed to torch.

    ``key`` is the config key the name came from (``encode.device``), for the error message.
    """
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}={name!r} but this process sees no CUDA device; use {key}=cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def setup_runtime(
    device: str,
    *,
    key: str,
    amp: bool,
    channels_last: bool,
    amp_dtype: Literal["bf16", "fp16"] = "bf16",
) -> Runtime:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else run single-process.

    ``key`` names the config section's device key (``distill.device``) for error messages. NCCL on CUDA, gloo
    on CPU. ``amp`` and ``channels_last`` are CUDA-only: on CPU the runtime reports them off.
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r}; choices: {', '.join(AMP_DTYPES)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, key, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    on_cuda = dev.type == "cuda"
    return Runtime(
        dev,
        rank,
        world_size,
        local_rank,
        amp=amp and on_cuda,
        amp_dtype=AMP_DTYPES[amp_dtype],
        channels_last=channels_last and on_cuda,
    )


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group this runtime joined (no-op single-process)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU + every CUDA device) before building models."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
