"""Picture of one bank row: the input the teacher saw beside PCA-to-RGB of each level."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bank.reader import Bank  # noqa: E402
from bank.spec import BankError  # noqa: E402
from bank.viz import pca_rgb  # noqa: E402


def render_row(path: str | Path, row: int, out: str | Path) -> dict[str, Any]:
    """Write the picture of ``row`` to ``out``; returns ``{"key", "ok", "reason"}`` (``reason``: why the image
    was rejected, for a row that is not OK; its pixels and features are zeros)."""
    bank = Bank.open(path, require_complete=False)
    if not 0 <= row < bank.num_rows:
        raise BankError(
            f"--row {row} is out of range: the bank {path} has {bank.num_rows} rows (0..{bank.num_rows - 1})"
        )
    shard = row // bank.spec.shard_rows
    if shard not in bank.markers:
        raise BankError(
            f"row {row} is in shard {shard}, which is not written yet; re-run encode to finish the bank"
        )
    batch = bank.read_rows([row])
    key = bank.keys([row])[0]
    ok = bool(batch["ok"][0])
    reason = None if ok else bank.rejects.get(key, "rejected (no reason recorded)")
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
    title = f"row {row}: {key} draw {int(batch['draw'][0])} flip {int(batch['flip'][0])}"
    if not ok:
        title = f"REJECTED {title} ({reason}): zeros, not features"
    fig.suptitle(title, fontsize=10, color="black" if ok else "red")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return {"key": key, "ok": ok, "reason": reason}
