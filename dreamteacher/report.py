"""The demo's ``report.md`` and its pictures (matplotlib): data, teacher features, regressor reproductions, loss
curves, predictions beside ground truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sources import demo_scenes as demo_data  # noqa: E402

if TYPE_CHECKING:
    from dreamteacher.demo import DemoPlan

FEATURE_ROWS = 3
"""Bank images shown in the feature figure."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _palette() -> np.ndarray:
    rng = np.random.default_rng(3)
    colours = rng.integers(40, 255, (256, 3), dtype=np.uint8)
    colours[0] = (0, 0, 0)
    return colours


def data_figure(path: Path, n: int = 4) -> Path:
    """Few-label images with their semantic labels, and COCO-split images with their instance masks."""
    colours = _palette()
    fig, axes = plt.subplots(4, n, figsize=(2 * n, 8), squeeze=False)
    for i in range(n):
        scene = demo_data.scene_for("fewshot-train", i)
        axes[0, i].imshow(scene.image_HW3)
        axes[1, i].imshow(colours[scene.semantic_HW])
        coco_scene = demo_data.scene_for("coco-train", i)
        instances = np.zeros(coco_scene.semantic_HW.shape, np.int64)
        for k, inst in enumerate(coco_scene.instances):
            instances[inst["visible"] > 0] = k + 10
        axes[2, i].imshow(coco_scene.image_HW3)
        axes[3, i].imshow(colours[instances])
    for ax, title in zip(axes[:, 0], ("image", "semantic", "image", "instances"), strict=True):
        ax.set_ylabel(title)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("demo scenes: " + ", ".join(f"{k}={name}" for k, name in enumerate(demo_data.CLASSES)))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@torch.inference_mode()
def feature_figure(path: Path, bank_path: Path, exp_dir: Path, student_name: str, regressor_channels: int,
                   pool_scales: list[int]) -> Path:  # fmt: skip
    """Per image: the teacher's features per level (PCA -> RGB) and the student regressor's reproductions.

    Each map gets its own PCA (``bank.viz.pca_rgb``), so colours are comparable in structure, not in hue.
    """
    from bank import Bank, pca_rgb
    from distill.model import DistillNet
    from distill.student import build_student

    bank = Bank.open(bank_path)
    flips = np.asarray(bank.row_meta["flip"])
    rows = [int(r) for r in np.flatnonzero(flips == 0)[:FEATURE_ROWS]]
    levels = sorted((lv for lv in bank.levels), key=lambda lv: lv.stride)
    teacher = bank.decode_rows(rows, [lv.name for lv in levels])  # {level: (n, C, h, w)}
    images_n3HW = bank.read_rows(rows, [])["image"]
    student = build_student(student_name, str(exp_dir / "backbone.safetensors"))
    channels = {lv.name: lv.channels for lv in levels}
    net = DistillNet(student, channels, channels=regressor_channels, pool_scales=pool_scales)
    head = load_file(str(exp_dir / "regressor.safetensors"))
    net.regressor.load_state_dict(
        {k.removeprefix("regressor."): v for k, v in head.items() if k.startswith("regressor.")}
    )
    net.eval()
    predicted = net(net.normalize(torch.from_numpy(images_n3HW)))  # {level: (n, C, h, w)}
    cols = 1 + len(levels)
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(2 * cols, 4 * len(rows)), squeeze=False)
    for i in range(len(rows)):
        for r in (0, 1):
            axes[2 * i + r, 0].imshow(images_n3HW[i].transpose(1, 2, 0))
        axes[2 * i, 0].set_ylabel("teacher")
        axes[2 * i + 1, 0].set_ylabel("student regressor")
        for j, lv in enumerate(levels):
            axes[2 * i, j + 1].imshow(pca_rgb(teacher[lv.name][i]), interpolation="nearest")
            axes[2 * i + 1, j + 1].imshow(
                pca_rgb(predicted[lv.name][i].float().numpy()), interpolation="nearest"
            )
            if i == 0:
                axes[0, j + 1].set_title(f"{lv.name} ({lv.height}x{lv.width}x{lv.channels})")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def loss_figure(path: Path, exp_dir: Path, finetune_dirs: dict[tuple[str, str, int], Path]) -> Path:
    """Distillation losses, and fine-tuning training loss per run (both inits)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    records = _read_jsonl(exp_dir / "metrics.jsonl")
    for key in ("loss", "mse", "at"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[0].plot(*zip(*points, strict=True), label=key)
    axes[0].set_title("distillation")
    axes[0].set_yscale("log")
    for ax, task in zip(axes[1:], ("fewshot", "coco"), strict=True):
        for (t, init, seed), folder in sorted(finetune_dirs.items()):
            if t != task:
                continue
            points = [
                (r["step"], r["train/loss"])
                for r in _read_jsonl(folder / "metrics.jsonl")
                if "train/loss" in r
            ]
            if points:
                colour = "tab:blue" if init == "distilled" else "tab:orange"
                ax.plot(
                    *zip(*points, strict=True), ".-", color=colour, alpha=0.7, label=f"{init} seed {seed}"
                )
        ax.set_title(f"fine-tuning: {task}")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(plan: DemoPlan, exp_dir: Path, results: dict[str, Any], table: str) -> Path:
    """``<out>/report.md`` plus the PNGs it shows (in ``<out>/report/``)."""
    out = plan.out
    pics = out / "report"
    pics.mkdir(parents=True, exist_ok=True)
    finetune_dirs = {key: Path(c.finetune.out) / c.finetune.exp for key, c in plan.finetune.items()}
    dcfg = plan.distill.distill
    figures = {
        "data": data_figure(pics / "data.png"),
        "features": feature_figure(
            pics / "features.png",
            Path(dcfg.bank),
            exp_dir,
            dcfg.student.name,
            dcfg.regressor.channels,
            dcfg.regressor.pool_scales,
        ),  # fmt: skip
        "losses": loss_figure(pics / "losses.png", exp_dir, finetune_dirs),
    }
    teacher_samples = Path(plan.encode.teacher(plan.encode.encode.teacher).path) / "samples.png"
    if teacher_samples.is_file():
        figures["teacher_samples"] = Path(shutil.copyfile(teacher_samples, pics / "teacher_samples.png"))
    first_seed = min(seed for _, _, seed in plan.finetune)
    for (task, init, seed), folder in finetune_dirs.items():
        if seed == first_seed and (folder / "predictions.png").is_file():
            figures[f"pred_{task}_{init}"] = Path(
                shutil.copyfile(folder / "predictions.png", pics / f"predictions_{task}_{init}.png")
            )

    def img(name: str, caption: str) -> str:
        return f"![{caption}]({figures[name].relative_to(out)})\n" if name in figures else ""

    t = results["timings_s"]
    enc = results["encode"]
    lines = [
        f"# DreamTeacher demo report ({results['size']} size)",
        "",
        "```",
        table,
        "```",
        "",
        f"Wall time: {t['total']:.0f} s (data {t['data']:.0f} s, encode {t['encode']:.0f} s, "
        f"distill {t['distill']:.0f} s, fine-tune {t['finetune']:.0f} s). Bank: {enc['bank_path']}.",
        "",
        "Per run (task, init, seed): " + "; ".join(
            f"{r['task']}/{r['init']}/{r['seed']}: "
            + ", ".join(f"{k}={r['metrics'][k]:.2f}" for k in ("mIoU", "segm_AP", "bbox_AP") if k in r["metrics"])
            for r in results["runs"]
        ),
        "",
        "## Teacher diagnostic: per-pixel linear probe on the few-label split (test mIoU %, stride-4 grid)",
        "",
        "| features | mIoU |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in results["teacher_probe_mIoU"].items()),
        "",
        "The teacher's four decoder levels (T as encoded, one draw) vs the same UNet with random weights vs the "
        "pixels (see dreamteacher/probe.py). Distillation can only pass on what the teacher's features hold.",
        "",
        "## Data",
        img("data", "demo scenes and labels"),
        "## Teacher samples (DDIM, EMA weights)",
        img("teacher_samples", "teacher samples"),
        "## Teacher features and the student's reproductions (PCA to RGB, per level)",
        img("features", "teacher vs student features"),
        "## Loss curves",
        img("losses", "loss curves"),
        "## Predictions beside ground truth (first seed)",
    ]  # fmt: skip
    for task in ("fewshot", "coco"):
        for init in ("distilled", "random"):
            if f"pred_{task}_{init}" in figures:
                lines += [f"### {task}, {init} init", img(f"pred_{task}_{init}", f"{task} {init}")]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
