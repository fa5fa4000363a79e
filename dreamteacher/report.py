"""The demo's ``report.md`` and its pictures (matplotlib): data, teacher features, regressor reproductions, loss and
validation curves, predictions beside ground truth.

The report takes plain inputs (:class:`ReportInputs`: paths, names, numbers) that the demo builds, so this module
does not import the demo (which imports it). Colours are one per class name (:func:`class_colours`, the fine-tuning
palette), used by every figure and explained by a legend, so "star" is the same colour in the data, the few-label
predictions and the COCO predictions.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from finetune.report import palette  # noqa: E402
from sources import demo_scenes as demo_data  # noqa: E402
from sources.images import to_rgb

FEATURE_ROWS = 3
"""Bank images shown in the feature figure."""
COCO_IMAGES = 4
"""Validation images shown in the COCO prediction figure."""
SCORE_THRESHOLD = 0.5
"""Detections drawn in the COCO figure (and counted in its caption)."""
UPSCALE = 4
"""The demo's 64 px images are drawn 4x (nearest) so box labels are legible."""
INITS = ("distilled", "mix", "random")
INIT_COLOURS = {"distilled": "tab:blue", "mix": "tab:green", "random": "tab:orange"}


@dataclass(frozen=True)
class ReportInputs:
    """What the report reads, as plain values (the demo fills it from its plan)."""

    out: Path
    """``report.md`` and ``report/`` go here."""
    bank: Path
    distill_dir: Path
    """The distill experiment folder: ``backbone.safetensors``, ``regressor.safetensors``, ``metrics.jsonl``."""
    student: str
    regressor_channels: int
    pool_scales: list[int]
    whiten: str
    """``distill.loss.whiten``: the regressor predicts the whitened teacher feature, so it is compared with that."""
    levels: list[str] = field(default_factory=list)
    """Distilled bank levels; empty = every level of the bank."""
    finetune_dirs: dict[tuple[str, str, int], Path] = field(default_factory=dict)
    """(task, init, seed) -> fine-tuning run folder."""
    coco_root: Path | None = None
    """The COCO-layout data the ``coco`` runs evaluated on (``val2017/``, ``annotations/``)."""
    teacher_dir: Path | None = None
    """The teacher's folder; its ``samples.png`` is shown when present."""


# ---------------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------------
def class_colours() -> np.ndarray:
    """(K, 3) uint8, row k = class ``demo_scenes.CLASSES[k]``: the colours the few-label runs' ``predictions.png``
    use (``finetune.report.palette`` over the K classes of ``classes.txt``), so every figure agrees with them."""
    return palette(demo_data.NUM_CLASSES)[: demo_data.NUM_CLASSES]


def _legend(ax: plt.Axes, class_ids: list[int] | None = None, **kwargs: Any) -> None:
    colours = class_colours()
    ids = class_ids if class_ids is not None else list(range(demo_data.NUM_CLASSES))
    handles = [Patch(color=colours[k] / 255.0, label=demo_data.CLASSES[k]) for k in ids]
    ax.legend(handles=handles, fontsize=7, **kwargs)


def _colour_labels(label_HW: np.ndarray) -> np.ndarray:
    """Class ids -> colours; anything outside 0..K-1 (ignore) is black."""
    colours = np.concatenate([class_colours(), np.zeros((1, 3), np.uint8)])
    index = np.where((label_HW >= 0) & (label_HW < demo_data.NUM_CLASSES), label_HW, demo_data.NUM_CLASSES)
    return colours[index]


def draw_instances(
    image_HW3: np.ndarray,
    boxes_N4: np.ndarray,
    class_ids: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    masks_NHW: np.ndarray | None = None,
    scale: int = UPSCALE,
) -> np.ndarray:
    """Instances drawn with torchvision: masks (alpha 0.45), xyxy boxes and "class score" labels, in class colours.

    The image is enlarged ``scale`` times (nearest) first and boxes scaled with it; returns (H*s, W*s, 3) uint8.
    """
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image_3HW = torch.from_numpy(np.array(image_HW3, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    image_3HW = image_3HW.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    colours = [tuple(int(v) for v in class_colours()[int(k)]) for k in class_ids]
    if masks_NHW is not None and len(masks_NHW):
        masks = torch.from_numpy(np.asarray(masks_NHW) > 0)
        masks = masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        image_3HW = draw_segmentation_masks(image_3HW, masks, alpha=0.45, colors=colours)
    if len(boxes_N4):
        names = [demo_data.CLASSES[int(k)] for k in class_ids]
        labels = names if scores is None else [f"{n} {s:.2f}" for n, s in zip(names, scores, strict=True)]
        boxes = torch.as_tensor(np.asarray(boxes_N4, dtype=np.float32) * scale)
        image_3HW = draw_bounding_boxes(image_3HW, boxes, labels=labels, colors=colours, width=2)
    return image_3HW.permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def data_figure(path: Path, n: int = 4) -> Path:
    """Few-label images with their semantic labels, and COCO-split images with their instances (class colours)."""
    from pycocotools import mask as mask_utils

    fig, axes = plt.subplots(4, n, figsize=(2.2 * n, 8.8), squeeze=False)
    for i in range(n):
        scene = demo_data.scene_for("fewshot-train", i)
        axes[0, i].imshow(scene.image_HW3)
        axes[1, i].imshow(_colour_labels(scene.semantic_HW), interpolation="nearest")
        coco_scene = demo_data.scene_for("coco-train", i)
        masks = np.stack([inst["visible"] for inst in coco_scene.instances]) if coco_scene.instances else None
        boxes = np.zeros((0, 4))
        if masks is not None:
            xywh = mask_utils.toBbox(
                mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
            )
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        ids = np.array([inst["class_id"] for inst in coco_scene.instances], dtype=np.int64)
        axes[2, i].imshow(coco_scene.image_HW3)
        axes[3, i].imshow(draw_instances(coco_scene.image_HW3, boxes, ids, masks_NHW=masks))
    for ax, title in zip(axes[:, 0], ("image", "semantic", "image", "instances"), strict=True):
        ax.set_ylabel(title)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _legend(axes[1, -1], loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("demo scenes (colour = class, the same in every figure)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Features: one PCA basis per level, fitted on the teacher, used for the student too
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PCABasis:
    """Top-3 principal directions of a (C, H, W) map's pixels, with the colour stretch fitted on the same map."""

    mean_C: np.ndarray
    components_Ck: np.ndarray
    lo_k: np.ndarray
    hi_k: np.ndarray


def fit_pca(feats_CHW: np.ndarray, *, lo_pct: float = 1.0, hi_pct: float = 99.0) -> PCABasis:
    """PCA of the pixels (as ``bank.viz.pca_rgb``: C x C covariance, sign fixed so the largest loading is positive,
    percentile stretch), returned instead of applied, so another map can be drawn in the same colours."""
    feats_CHW = np.asarray(feats_CHW, dtype=np.float64)
    c = feats_CHW.shape[0]
    pixels_NC = feats_CHW.reshape(c, -1).T
    mean_C = pixels_NC.mean(axis=0)
    centred_NC = pixels_NC - mean_C
    cov_CC = centred_NC.T @ centred_NC / max(1, len(centred_NC) - 1)
    _, vectors = np.linalg.eigh(cov_CC)  # ascending eigenvalues
    top_Ck = vectors[:, ::-1][:, : min(3, c)]
    top_Ck = top_Ck * np.sign(top_Ck[np.abs(top_Ck).argmax(axis=0), np.arange(top_Ck.shape[1])])
    comps_Nk = centred_NC @ top_Ck
    lo, hi = np.percentile(comps_Nk, lo_pct, axis=0), np.percentile(comps_Nk, hi_pct, axis=0)
    return PCABasis(mean_C, top_Ck, lo, hi)


def project_rgb(feats_CHW: np.ndarray, basis: PCABasis) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8 in ``basis``'s colours: equal features, equal colours, across maps."""
    feats_CHW = np.asarray(feats_CHW, dtype=np.float64)
    c, h, w = feats_CHW.shape
    comps_Nk = (feats_CHW.reshape(c, -1).T - basis.mean_C) @ basis.components_Ck
    scaled = (comps_Nk - basis.lo_k) / np.maximum(basis.hi_k - basis.lo_k, 1e-12)
    if scaled.shape[1] < 3:
        scaled = np.pad(scaled, ((0, 0), (0, 3 - scaled.shape[1])))
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8).reshape(h, w, 3)


def level_error(pred_nCHW: torch.Tensor, target_nCHW: torch.Tensor) -> float:
    """Mean squared error of the prediction against the whitened teacher feature: the distillation ``mse`` term.

    The whitened target has unit variance, so 1.0 is what predicting zeros scores and 0.0 is a perfect copy."""
    return float(torch.mean((pred_nCHW.float() - target_nCHW.float()) ** 2))


@torch.inference_mode()
def feature_figure(path: Path, inputs: ReportInputs) -> tuple[Path, dict[str, float]]:
    """Per image: the whitened teacher feature per level and the regressor's prediction, both drawn in the
    teacher's PCA basis (fitted per image and level on the teacher map); returns each level's error."""
    import torch.nn.functional as F

    from bank import Bank
    from distill.losses import whiten
    from distill.model import DistillNet
    from distill.student import build_student

    bank = Bank.open(inputs.bank)
    flips = np.asarray(bank.row_meta["flip"])
    rows = [int(r) for r in np.flatnonzero(flips == 0)[:FEATURE_ROWS]]
    levels = [lv for lv in bank.levels if not inputs.levels or lv.name in inputs.levels]
    levels = sorted(levels, key=lambda lv: lv.stride)
    decoded = bank.decode_rows(rows, [lv.name for lv in levels])  # {level: (n, C, h, w)}
    images_n3HW = bank.read_rows(rows, [])["image"]
    student = build_student(inputs.student, str(inputs.distill_dir / "backbone.safetensors"))
    channels = {lv.name: lv.channels for lv in levels}
    head = load_file(str(inputs.distill_dir / "regressor.safetensors"))
    # a label-distilled run's regressor also builds the stride-4 output its label head reads
    num_classes = int(head["label_head.weight"].shape[0]) if "label_head.weight" in head else 0
    net = DistillNet(
        student, channels, channels=inputs.regressor_channels, pool_scales=inputs.pool_scales,
        num_classes=num_classes,
    )  # fmt: skip
    net.regressor.load_state_dict(
        {k.removeprefix("regressor."): v for k, v in head.items() if k.startswith("regressor.")}
    )
    net.eval()
    predicted = net(net.normalize(torch.from_numpy(images_n3HW)))  # {level: (n, C, h, w)}
    targets, errors = {}, {}
    for lv in levels:
        target = whiten(torch.from_numpy(np.asarray(decoded[lv.name])).float(), inputs.whiten)  # type: ignore[arg-type]
        pred = predicted[lv.name].float()
        if target.shape[-2:] != pred.shape[-2:]:  # as distill does
            target = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
        targets[lv.name] = target.numpy()
        errors[lv.name] = level_error(pred, target)
    cols = 1 + len(levels)
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(2 * cols, 4 * len(rows) + 0.4), squeeze=False)
    for i in range(len(rows)):
        for r in (0, 1):
            axes[2 * i + r, 0].imshow(images_n3HW[i].transpose(1, 2, 0))
        axes[2 * i, 0].set_ylabel("teacher (whitened)")
        axes[2 * i + 1, 0].set_ylabel("student regressor")
        for j, lv in enumerate(levels):
            basis = fit_pca(targets[lv.name][i])
            axes[2 * i, j + 1].imshow(project_rgb(targets[lv.name][i], basis), interpolation="nearest")
            pred_i = predicted[lv.name][i].float().numpy()
            axes[2 * i + 1, j + 1].imshow(project_rgb(pred_i, basis), interpolation="nearest")
            err_i = float(np.mean((pred_i - targets[lv.name][i]) ** 2))
            axes[2 * i + 1, j + 1].set_title(f"mse {err_i:.3f}", fontsize=8)
            if i == 0:
                axes[0, j + 1].set_title(f"{lv.name} ({lv.height}x{lv.width}x{lv.channels})\nmse {errors[lv.name]:.3f}",
                                         fontsize=8)  # fmt: skip
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("teacher and student in the teacher's PCA colours; mse vs the whitened teacher (1 = predicting 0)",
                 fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path, errors


# ---------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(path: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` in a run's ``metrics.jsonl``; a step logged twice (a resumed run) keeps the last."""
    points = {int(r["step"]): float(r[key]) for r in _read_jsonl(path) if r.get(key) is not None}
    return sorted(points.items())


VAL_METRICS = {"fewshot": ("val/mIoU",), "coco": ("val/segm_AP", "val/bbox_AP")}
"""Validation metrics the fine-tuning tasks log at each evaluation (``finetune.eval_every`` and the end)."""


def loss_figure(path: Path, distill_dir: Path, finetune_dirs: dict[tuple[str, str, int], Path]) -> Path:
    """Top: distillation losses, fine-tuning training loss per run. Bottom: distillation per-level mse, and the
    fine-tuning runs' validation metrics at each evaluation (blue = distilled init, green = mix-distilled,
    orange = random)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    records = distill_dir / "metrics.jsonl"
    for key in ("loss", "mse", "at"):
        points = series(records, key)
        if points:
            axes[0, 0].plot(*zip(*points, strict=True), label=key)
    axes[0, 0].set_title("distillation")
    keys = sorted({k for r in _read_jsonl(records) for k in r if k.startswith("mse/")})
    for key in keys:
        axes[1, 0].plot(*zip(*series(records, key), strict=True), label=key)
    axes[1, 0].set_title("distillation: mse per level")
    for ax in axes[:, 0]:
        if ax.lines:
            ax.set_yscale("log")
    for col, task in enumerate(("fewshot", "coco"), start=1):
        for (t, init, seed), folder in sorted(finetune_dirs.items()):
            if t != task:
                continue
            colour = INIT_COLOURS[init]
            points = series(folder / "metrics.jsonl", "train/loss")
            if points:
                axes[0, col].plot(*zip(*points, strict=True), ".-", color=colour, alpha=0.7,
                                  label=f"{init} seed {seed}")  # fmt: skip
            for key, marker in zip(VAL_METRICS[task], ("o-", "s--"), strict=False):
                points = series(folder / "metrics.jsonl", key)
                if points:
                    axes[1, col].plot(*zip(*points, strict=True), marker, color=colour, alpha=0.8,
                                      label=f"{key.removeprefix('val/')} {init} seed {seed}")  # fmt: skip
        axes[0, col].set_title(f"fine-tuning {task}: training loss")
        axes[1, col].set_title(f"fine-tuning {task}: validation ({', '.join(VAL_METRICS[task])})")
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------------------------------------------
def coco_figure(path: Path, coco_root: Path, runs: dict[str, Path], count: int = COCO_IMAGES) -> Path | None:
    """Validation images: ground-truth instances, then each run's detections with score >= ``SCORE_THRESHOLD``
    (masks, boxes, "class score"), from the run's ``coco_results.json``; class colours and a legend."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    ann_file = coco_root / "annotations" / "instances_val2017.json"
    results = {init: folder / "coco_results.json" for init, folder in runs.items()}
    results = {init: p for init, p in results.items() if p.is_file()}
    if not ann_file.is_file() or not results:
        return None
    gt = json.loads(ann_file.read_text())
    name_to_class = {name: k for k, name in enumerate(demo_data.CLASSES)}
    cat_to_class = {c["id"]: name_to_class.get(c["name"], 0) for c in gt["categories"]}
    images = sorted(gt["images"], key=lambda im: im["id"])[:count]
    detections = {init: json.loads(p.read_text()) for init, p in results.items()}

    def panel(image: np.ndarray, anns: list[dict[str, Any]], with_scores: bool) -> np.ndarray:
        h, w = image.shape[:2]
        masks = []
        for ann in anns:
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            masks.append(mask_utils.decode(rle))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], dtype=np.float32).reshape(-1, 4)  # fmt: skip
        ids = np.array([cat_to_class[a["category_id"]] for a in anns], dtype=np.int64)
        scores = np.array([a["score"] for a in anns]) if with_scores else None
        return draw_instances(image, boxes, ids, scores=scores, masks_NHW=np.stack(masks) if masks else None)

    cols = 1 + len(detections)
    fig, axes = plt.subplots(len(images), cols, figsize=(3.2 * cols + 1.2, 3.2 * len(images)), squeeze=False)
    for r, im in enumerate(images):
        image = np.asarray(to_rgb(Image.open(coco_root / "val2017" / im["file_name"])))
        truth = [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a.get("iscrowd", 0)]
        axes[r, 0].imshow(panel(image, truth, with_scores=False))
        for c, (init, dets) in enumerate(sorted(detections.items()), start=1):
            scored = sorted((d for d in dets if d["image_id"] == im["id"]), key=lambda d: -d["score"])
            mine = [d for d in scored if d["score"] >= SCORE_THRESHOLD]
            axes[r, c].imshow(panel(image, mine, with_scores=True))
            best = f"best {scored[0]['score']:.2f}" if scored else "no detections"
            caption = f"{len(mine)} with score >= {SCORE_THRESHOLD} ({best})"
            axes[r, c].set_title(f"{init} init: {caption}" if r == 0 else caption, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("ground truth")
    for ax in axes.flat:
        ax.axis("off")
    _legend(axes[0, -1], list(range(1, demo_data.NUM_CLASSES)), loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def with_legend(source: Path, path: Path, title: str) -> Path:
    """A run's ``predictions.png`` (drawn with :func:`class_colours`) with the class legend beside it."""
    picture = plt.imread(str(source))
    height, width = picture.shape[:2]
    fig, ax = plt.subplots(figsize=(width / 80 + 1.6, height / 80))
    ax.imshow(picture)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------------
def interpreter_lines(interpreter: dict[str, Any] | None) -> list[str]:
    """The feature interpreter's own score (the ddpm-segmentation-style baseline the mix column builds on)."""
    if not interpreter:
        return []
    return [
        "## Feature interpreter (label distillation's teacher)",
        "",
        f"Trained on the teacher features of {interpreter['train_images']} labelled images (fresh noise per epoch), "
        f"scored on {interpreter['test_images']} test images: **mIoU {interpreter['mIoU']:.2f}** "
        f"(mAcc {interpreter['mAcc']:.2f}); interpreter sha256 {interpreter['sha256'][:12]}. Its logits for every "
        "bank row are the soft labels the mix-distilled student learned with the features (docs/interpreter.md).",
        "",
    ]


def write_report(inputs: ReportInputs, results: dict[str, Any], table: str) -> Path:
    """``<out>/report.md`` plus the PNGs it shows (in ``<out>/report/``)."""
    out = inputs.out
    pics = out / "report"
    pics.mkdir(parents=True, exist_ok=True)
    features, level_errors = feature_figure(pics / "features.png", inputs)
    figures: dict[str, Path] = {
        "data": data_figure(pics / "data.png"),
        "features": features,
        "losses": loss_figure(pics / "losses.png", inputs.distill_dir, inputs.finetune_dirs),
    }
    if inputs.teacher_dir is not None and (inputs.teacher_dir / "samples.png").is_file():
        figures["teacher_samples"] = Path(shutil.copyfile(inputs.teacher_dir / "samples.png",
                                                          pics / "teacher_samples.png"))  # fmt: skip
    seeds = [seed for _, _, seed in inputs.finetune_dirs]
    first_seed = min(seeds) if seeds else 0
    first = {
        (task, init): folder
        for (task, init, seed), folder in inputs.finetune_dirs.items()
        if seed == first_seed
    }
    for init in INITS:
        folder = first.get(("fewshot", init))
        if folder is not None and (folder / "predictions.png").is_file():
            figures[f"pred_fewshot_{init}"] = with_legend(folder / "predictions.png",
                                                          pics / f"predictions_fewshot_{init}.png",
                                                          f"few-label segmentation, {init} init")  # fmt: skip
    for init in INITS:  # drawn here, not copied: the run's own picture has no boxes, scores or shared colours
        folder = first.get(("coco", init))
        if inputs.coco_root is not None and folder is not None:
            picture = coco_figure(pics / f"predictions_coco_{init}.png", inputs.coco_root, {init: folder})
            if picture is not None:
                figures[f"pred_coco_{init}"] = picture

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
        f"interpret {t.get('interpret', 0):.0f} s, distill {t['distill']:.0f} s (both students), "
        f"fine-tune {t['finetune']:.0f} s). Bank: {enc['bank_path']}.",
        "",
        "Per run (task, init, seed): " + "; ".join(
            f"{r['task']}/{r['init']}/{r['seed']}: "
            + ", ".join(f"{k}={r['metrics'][k]:.2f}" for k in ("mIoU", "segm_AP", "bbox_AP") if k in r["metrics"])
            for r in results["runs"]
        ),
        "",
        *interpreter_lines(results.get("interpreter")),
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
        "## Teacher features and the student's reproductions",
        "",
        "Both rows of a level are drawn in the same colours: the PCA basis and colour stretch are fitted on the "
        "(whitened) teacher map and the student's prediction is projected onto it, so a colour difference is a "
        "feature difference. Error per level (mse against the whitened teacher, the distillation loss term; "
        f"1.0 = predicting zeros), over the {FEATURE_ROWS} images shown:",
        "",
        "| level | mse |",
        "|---|---|",
        *(f"| {name} | {value:.3f} |" for name, value in level_errors.items()),
        "",
        img("features", "teacher vs student features"),
        "## Loss and validation curves",
        img("losses", "loss and validation curves"),
        "## Predictions beside ground truth (first seed; colour = class, as in the data figure)",
    ]  # fmt: skip
    for init in INITS:
        if f"pred_fewshot_{init}" in figures:
            lines += [f"### fewshot, {init} init", img(f"pred_fewshot_{init}", f"fewshot {init}")]
    for init in INITS:
        if f"pred_coco_{init}" in figures:
            lines += [
                f"### coco, {init} init: instances with boxes and scores",
                img(f"pred_coco_{init}", f"coco {init}"),
            ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
