"""The fine-tuning train loop and its resume (shared plumbing: training.checkpoint/metrics/runtime/sampler)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finetune.config import OptimConfig
from finetune.optim import set_lr
from training.accumulate import accumulate_backward
from training.checkpoint import load_checkpoint, save_checkpoint
from training.deferred import DeferredTerms
from training.metrics import MetricsLog
from training.runtime import Runtime


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
    accum_steps: int = 1,
    schedule: Callable[[int], float] | None = None,
    after_step: Callable[[int], None] | None = None,
    extra_state: Callable[[], dict[str, object]] | None = None,
) -> list[float]:
    """Run steps ``start..total-1``; returns the per-step total loss (this rank).

    Torch's, numpy's and Python's RNGs (dropout, RoI sampling, Mixup / CutMix) are re-seeded from
    ``(seed, step, rank)`` every step, so a resumed run repeats an uninterrupted one exactly on the same hardware.
    Each step's batch is split into ``accum_steps`` micro-batches (``training.accumulate``). ``schedule(step)``
    sets and returns the lr (default: ``optim_cfg``'s warm-up + poly / step); ``after_step(done)`` runs after each
    update (model EMA); ``extra_state()`` adds entries to the checkpoint (the EMA weights).
    """
    history: list[float] = []
    terms = DeferredTerms(FloatingPointError, "lower the lr or check the data")
    model.train()
    bar = tqdm(
        range(start, total), desc="finetune", disable=not (progress and runtime.is_main), dynamic_ncols=True
    )
    for step, batch in zip(bar, batches, strict=False):
        # 1. Learning rate and RNG state for this step.
        lr = schedule(step) if schedule is not None else set_lr(optimizer, step, total, optim_cfg)
        step_seed = seed * 1_000_003 + step * 1_009 + runtime.rank
        torch.manual_seed(step_seed)
        np.random.seed(step_seed % 2**32)
        random.seed(step_seed)
        # 2. Forward + losses under autocast, backward per micro-batch (DDP syncs on the last one).
        optimizer.zero_grad(set_to_none=True)

        def forward(part: object) -> dict[str, torch.Tensor]:
            with runtime.autocast():
                return compute_losses(model, part)

        losses = accumulate_backward(model, batch, accum_steps, forward, total_key=None)
        loss = losses.pop("_total")
        # 3. Clip, update. The terms stay on the device until the next log / checkpoint (no host sync here); a
        #    non-finite one raises there, naming its step, before any checkpoint of the bad state.
        if optim_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step + 1)
        terms.add(step, {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})
        done = step + 1
        # 4. Log, checkpoint, evaluate.
        log_now = done % log_every == 0 or done == total
        save_now = runtime.is_main and (done % checkpoint_every == 0 or done == total)
        if log_now or save_now:
            flushed = terms.flush()
            history.extend(values["loss"] for values in flushed)
        if log_now:
            last = flushed[-1]
            record = {f"train/{k}": v for k, v in last.items() if k != "loss"}
            log.log(done, {"train/loss": last["loss"], "train/lr": lr, **record})
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if save_now:
            state = checkpoint_state(unwrap(model), optimizer, done)
            save_checkpoint(checkpoint, state | (extra_state() if extra_state is not None else {}))
        if on_eval is not None and eval_every > 0 and done % eval_every == 0 and done != total:
            on_eval(done)
            model.train()
    history.extend(values["loss"] for values in terms.flush())  # steps after the last boundary (a short run)
    runtime.barrier()
    return history
