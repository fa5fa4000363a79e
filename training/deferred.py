"""Per-step loss terms kept on the device and read on the host once per log window: no sync before backward.

Reading a CUDA scalar (``float(loss)``, ``.tolist()``, ``float(grad_norm)``) blocks the host until the GPU has
finished the step, so the next step's kernels cannot be queued behind it. A training loop instead hands each step's
terms to :class:`DeferredTerms` and calls :meth:`DeferredTerms.flush` where it needs numbers: at every log
boundary and before every checkpoint. The safety of a per-step check stays: a non-finite term raises at the flush,
naming the first bad step and all its terms, at most ``log_every`` steps after it happened, and never after a
checkpoint of the poisoned state was written (the loops flush before they save).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch


class DeferredTerms:
    """Queue of ``(step, {name: scalar tensor or float})``; :meth:`flush` reads them all in one transfer."""

    def __init__(self, error: Callable[[str], Exception] = FloatingPointError, hint: str = "") -> None:
        """``error`` builds the exception a non-finite term raises; ``hint`` is appended to its message (the
        fix, e.g. "lower the lr or check the data")."""
        self.error, self.hint = error, hint
        self._steps: list[int] = []
        self._names: list[tuple[str, ...]] = []
        self._tensors: list[torch.Tensor] = []
        self._host: list[dict[str, float]] = []
        self._unchecked: list[frozenset[str]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def add(
        self, step: int, terms: Mapping[str, torch.Tensor | float], *, unchecked: Iterable[str] = ()
    ) -> None:
        """Queue one step's terms. Tensors stay on the device (stacked: one small kernel, no sync); Python
        numbers (the lr) are kept as they are. ``unchecked`` names terms that may legitimately be non-finite
        (a grad norm the fp16 GradScaler skips a step for)."""
        names = tuple(k for k, v in terms.items() if isinstance(v, torch.Tensor))
        if names:
            stacked = torch.stack([terms[k].detach().float().reshape(()) for k in names])
        else:
            stacked = torch.empty(0)
        self._steps.append(int(step))
        self._names.append(names)
        self._tensors.append(stacked)
        self._host.append({k: float(v) for k, v in terms.items() if not isinstance(v, torch.Tensor)})
        self._unchecked.append(frozenset(unchecked))

    def flush(self) -> list[dict[str, float]]:
        """Every queued step's terms as floats, in order (one device->host transfer), and clear the queue.

        Raises ``error`` for the first step with a non-finite checked term, listing all that step's terms."""
        if not self._steps:
            return []
        devices = {t.device for t in self._tensors if t.numel()}
        flat = torch.cat([t.to(next(iter(devices))) for t in self._tensors]).tolist() if devices else []
        out, offset = [], 0
        queued = zip(self._steps, self._names, self._host, self._unchecked, strict=True)
        self._steps, self._names, self._tensors, self._host, self._unchecked = [], [], [], [], []
        for step, names, host, unchecked in queued:
            values = dict(zip(names, flat[offset : offset + len(names)], strict=True))
            offset += len(names)
            values.update(host)
            bad = [k for k, v in values.items() if k not in unchecked and not math.isfinite(v)]
            if bad:
                listing = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
                hint = f"; {self.hint}" if self.hint else ""
                raise self.error(f"non-finite loss at step {step} in {bad}; all terms: {listing}{hint}")
            out.append(values)
        return out
