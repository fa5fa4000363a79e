"""Gradient accumulation, shared by distill and finetune: one optimizer step over ``accum_steps`` micro-batches.

The global batch is ``per-device batch x devices x accum_steps``. A step's per-rank batch is split along its first
dimension into ``accum_steps`` equal micro-batches; each is forwarded and back-propagated with its loss scaled by
``1 / accum_steps``, so the summed gradient is that of the mean loss over the whole batch (exactly, for losses that
are means over equally sized micro-batches). Under DDP the gradient all-reduce runs only on the last micro-batch
(``no_sync`` on the others). The optimizer, the schedule and every counter see one step per call.

Batch norm caveat: BN computes its statistics per micro-batch (as it does per device under DDP without SyncBN), so
a model with BN matches the big-batch step only approximately; models without batch statistics match it to
float precision (``tests/test_accumulate.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def split_batch(batch: Any, parts: int, *, key: str = "accum_steps") -> list[Any]:
    """``batch`` -> ``parts`` micro-batches. A batch is a tensor, a list of samples, or a structure of those: a
    dict (the bank loader's, segmentation's) or a tuple (detection's ``(images, targets)``).

    Every tensor / list whose first dimension is the batch size ``B`` is cut into ``parts`` equal slices; other
    values (per-batch constants) are shared. ``B`` must be divisible by ``parts``.
    """
    if parts == 1:
        return [batch]
    size = _batch_size(batch)
    if size % parts:
        raise ValueError(f"the per-rank batch of {size} is not divisible by {key}={parts}; change either")
    step = size // parts
    return [_slice(batch, i * step, (i + 1) * step, size) for i in range(parts)]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, list):
        return len(batch)
    if isinstance(batch, tuple):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, (torch.Tensor, list, tuple, dict)):
                return _batch_size(value)
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def _slice(value: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(value, dict):
        return {k: _slice(v, start, stop, size) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_slice(v, start, stop, size) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
        return value[start:stop]
    if isinstance(value, list) and len(value) == size:
        return value[start:stop]
    return value


def accumulate_backward(
    model: nn.Module,
    batch: Any,
    accum_steps: int,
    loss_terms: Callable[[Any], dict[str, torch.Tensor]],
    *,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    total_key: str | None = "loss",
) -> dict[str, torch.Tensor]:
    """Forward + backward of ``batch`` in ``accum_steps`` micro-batches; returns each term's mean (detached).

    ``loss_terms(micro_batch)`` runs the forward and returns the loss terms; the one back-propagated is
    ``total_key`` (``None``: the sum of all terms). ``backward`` lets the caller scale the loss (GradScaler).
    Gradients are accumulated (the caller zeroes them before and steps the optimizer after).
    """
    micro = split_batch(batch, accum_steps)
    means: dict[str, torch.Tensor] = {}
    for i, part in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            terms = loss_terms(part)
            loss = terms[total_key] if total_key is not None else sum(terms.values())
            backward(loss / len(micro))
        for name, value in terms.items():
            value = value.detach().float() / len(micro)
            means[name] = value if name not in means else means[name] + value
        if total_key is None:
            total = loss.detach().float() / len(micro)
            means["_total"] = total if "_total" not in means else means["_total"] + total
    return means
