"""Run artifacts: ``results.json``, ``summary.md`` and ``predictions.png`` (prediction beside ground truth)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configlib import atomic_write_text  # noqa: E402


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: object) -> None:
    """Atomic JSON write; NaN (undefined metric) becomes null."""
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2))


def write_summary(
    path: Path, title: str, header: dict[str, object], metrics: dict[str, float], table: str = ""
) -> None:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: `{value}`" for key, value in header.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        lines.append(f"| {key} | {'n/a' if value is None or not math.isfinite(value) else f'{value:.2f}'} |")
    if table:
        lines += ["", "## Per class", "", table]
    path.write_text("\n".join(lines) + "\n")


def palette(num_classes: int) -> np.ndarray:
    """(K + 1, 3) uint8 colours; the last row (ignore / background) is black."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(num_classes + 1, 3), dtype=np.uint8)
    colours[-1] = 0
    return colours


def colourise(label_HW: np.ndarray, colours: np.ndarray) -> np.ndarray:
    index = np.where((label_HW >= 0) & (label_HW < len(colours) - 1), label_HW, len(colours) - 1)
    return colours[index]


def save_panels(
    path: Path, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], titles: tuple[str, str, str]
) -> None:
    """One row per sample: (image HxWx3 uint8, ground truth HxWx3, prediction HxWx3)."""
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            axes[r, c].imshow(panel)
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(titles[c])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
