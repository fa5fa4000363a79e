"""Task-independent training machinery: step-indexed sampling, the train loop, checkpoints, metric logs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from tqdm import tqdm

from finetune.config import OptimConfig
from finetune.optim import set_lr
from training.checkpoint import load_checkpoint, save_checkpoint
from training.metrics import MetricsLog
from training.runtime import Runtime


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's keys ``(index, aug_seed)`` for steps ``start..total-1``.

    The global order is a concatenation of per-epoch permutations seeded by ``(seed, epoch)``; every sample's
    augmentation seed is a function of ``(seed, step, slot)``. So a resumed run sees exactly the batches (and
    augmentations) of an uninterrupted one. Why not DistributedSampler: it cannot start mid-epoch.
    """

    def __init__(
        self, size: int, global_batch: int, total: int, start: int, seed: int, rank: int, world: int
    ):
        if global_batch % world:
            raise ValueError(f"finetune.batch_size={global_batch} is not divisible by the {world} ranks")
        self.size, self.batch, self.total, self.start = size, global_batch, total, start
        self.seed, self.rank, self.world = seed, rank, world
        self._cached: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size))
        return self._cached[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.batch // self.world
        for step in range(self.start, self.total):
            keys = []
            for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
                position = step * self.batch + slot
                epoch, offset = divmod(position, self.size)
                keys.append((int(self._epoch_order(epoch)[offset]), self.seed * 1_000_003 + position))
            yield keys


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, object]:
    """What a fine-tuning resume needs: weights, optimizer moments and the step. The schedule, the sampler order
    and every step's RNG are functions of the step (``set_lr``, :class:`StepBatchSampler`, the per-step seed in
    :func:`train_loop`), so no RNG or sampler state is stored."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}


def resume_step(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, resume: bool, eval_only: bool
) -> int:
    """Step to start from: 0 for a new run; else the checkpoint's (optimizer restored only to keep training)."""
    if not (resume or eval_only):
        return 0
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    if not eval_only:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_loop(
    *,
    model: nn.Module,
    compute_losses: Callable[[nn.Module, object], dict[str, torch.Tensor]],
    batches: Iterator,
    optimizer: torch.optim.Optimizer,
    optim_cfg: OptimConfig,
    start: int,
    total: int,
    runtime: Runtime,
    log: MetricsLog,
    checkpoint: Path,
    checkpoint_every: int,
    log_every: int,
    on_eval: Callable[[int], None] | None = None,
    eval_every: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Run steps ``start..total-1``; returns the per-step total loss (this rank).

    Torch's RNG (dropout, RoI sampling) is re-seeded from ``(seed, step, rank)`` every step, so a resumed run
    repeats an uninterrupted one exactly on the same hardware.
    """
    history: list[float] = []
    model.train()
    bar = tqdm(
        range(start, total), desc="finetune", disable=not (progress and runtime.is_main), dynamic_ncols=True
    )
    for step, batch in zip(bar, batches, strict=False):
        # 1. Learning rate and RNG state for this step.
        lr = set_lr(optimizer, step, total, optim_cfg)
        torch.manual_seed(seed * 1_000_003 + step * 1_009 + runtime.rank)
        # 2. Forward + losses under autocast.
        with runtime.autocast():
            losses = compute_losses(model, batch)
        loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
            raise FloatingPointError(
                f"non-finite loss at step {step}: {terms}; lower the lr or check the data"
            )
        # 3. Backward, clip, update.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        loss_value = float(loss.detach())
        history.append(loss_value)
        done = step + 1
        # 4. Log, checkpoint, evaluate.
        if done % log_every == 0 or done == total:
            terms = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
            log.log(done, {"train/loss": loss_value, "train/lr": lr, **terms})
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if runtime.is_main and (done % checkpoint_every == 0 or done == total):
            save_checkpoint(checkpoint, checkpoint_state(unwrap(model), optimizer, done))
        if on_eval is not None and eval_every > 0 and done % eval_every == 0 and done != total:
            on_eval(done)
            model.train()
    runtime.barrier()
    return history
