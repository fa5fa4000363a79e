"""Picture of one bank row: the input the teacher saw beside PCA-to-RGB of each level."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bank.reader import Bank  # noqa: E402
from bank.viz import pca_rgb  # noqa: E402


def render_row(path: str | Path, row: int, out: str | Path) -> None:
    bank = Bank.open(path, require_complete=False)
    batch = bank.read_rows([row])
    decoded = bank.decode_rows([row])
    panels = [("input", batch["image"][0].transpose(1, 2, 0))]
    panels += [
        (f"{lv.name} {lv.channels}x{lv.height}x{lv.width}", pca_rgb(decoded[lv.name][0]))
        for lv in bank.levels
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (title, image) in zip(axes, panels, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    key = bank.keys([row])[0]
    fig.suptitle(f"row {row}: {key} draw {int(batch['draw'][0])} flip {int(batch['flip'][0])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
