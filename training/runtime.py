"""Process setup shared by the fine-tuning tasks: device, torchrun/DDP, autocast, seeds."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

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
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA when enabled; a no-op context on CPU (tests run float32)."""
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

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


def setup_runtime(device: str, *, key: str, amp: bool, channels_last: bool) -> Runtime:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else run single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, key, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    on_cuda = dev.type == "cuda"
    return Runtime(
        dev, rank, world_size, local_rank, amp=amp and on_cuda, channels_last=channels_last and on_cuda
    )


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
