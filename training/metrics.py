"""Metrics sinks (metrics.jsonl + TensorBoard) and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Append one JSON line per record and mirror scalars to TensorBoard (``<exp>/tb``)."""

    def __init__(self, folder: str | Path, *, tensorboard: bool = True) -> None:
        self.path = Path(folder) / METRICS_NAME
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(folder) / "tb"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, *, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; after a resume the later record of a repeated step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if up_to_step is None or record["step"] <= up_to_step:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    path = Path(path)
    if path.is_file():
        kept = [json.dumps(r) for r in read_metrics(path, up_to_step=step)]
        path.write_text("".join(line + "\n" for line in kept))


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
