"""Metrics sinks (metrics.jsonl + TensorBoard) and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from configlib import atomic_write_text

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """One JSON line per record in ``<folder>/metrics.jsonl``, mirrored to TensorBoard (``<folder>/tb``).

    ``enabled=False`` (every rank but the main one) makes it a no-op, so the loops call :meth:`log` everywhere.
    ``resume_from=S`` continues a run whose checkpoint is at step S: records after S (written after that
    checkpoint by the run that died) are dropped from metrics.jsonl, and TensorBoard purges its events from step
    S + 1 on (SummaryWriter's ``purge_step``), so neither shows the re-run steps twice. S + 1 rather than S: the
    record of step S was written before the checkpoint of step S and is not written again.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_from: int | None = None,
    ) -> None:
        self.path = Path(folder) / METRICS_NAME
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if resume_from is not None:
            truncate_metrics(self.path, resume_from)
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_from is None else resume_from + 1
            self._tb = SummaryWriter(str(Path(folder) / "tb"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append ``{"step": step, **values}``; numbers also go to TensorBoard under their key."""
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class MetricsWindow:
    """Running sums of per-step values between two log records; its state goes into the checkpoint.

    Why in the checkpoint: when ``checkpoint_every`` is not a multiple of ``log_every`` a run stops (or dies)
    mid-window; restoring the sums makes the first record after a resume the mean over the same steps as in an
    uninterrupted run, so metrics.jsonl of a resumed run equals the uninterrupted one record for record (the
    alternative, restarting the window at the resumed step, would log a mean over fewer steps).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def mean(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}

    def reset(self) -> None:
        self.sums, self.steps = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])


def read_metrics(path: str | Path, *, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` merged per step (train and validation records of one step become one);
    after a resume the later value of a repeated key wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if up_to_step is None or record["step"] <= up_to_step:
                by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if path.is_file():
        kept = [json.dumps(r) for r in read_metrics(path, up_to_step=step)]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def plot_losses(exp_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss curves (total, MSE, AT, per level) of an experiment as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_dir = Path(exp_dir)
    records = read_metrics(exp_dir / METRICS_NAME)
    if not records:
        raise ValueError(f"{exp_dir / METRICS_NAME} has no records yet; train first (dreamteacher distill)")
    steps = [r["step"] for r in records]
    keys = sorted({k for r in records for k in r if k.startswith(("mse", "at", "loss", "label"))})
    panels = [
        ("total", [k for k in keys if k in ("loss", "mse", "at", "label")]),
        ("MSE per level", [k for k in keys if k.startswith("mse/")]),
        ("AT per level", [k for k in keys if k.startswith("at/")]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            ax.plot(steps, [r.get(name, float("nan")) for r in records], label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else exp_dir / "losses.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
