"""ImageNet-style classification: fine-tuning (RSB A2 pieces) and the linear probe on a tiny generated imagefolder.

Losses fall, top-1 / top-5 agree with a hand count, resume is exact, the backbone loads from a distill export (timm
names) or starts at random init.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from finetune import engine
from finetune.classification import evaluate_classifier, find_classes, topk_correct
from finetune.run import run_finetune as _run_finetune
from training.backbone import Backbone
from training.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def write_imagefolder(root: Path, n_train: int = 8, n_val: int = 3, size: int = 40) -> Path:
    """``<root>/{train,val}/<class>/*.png``: each class a noisy colour with a random darker square."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("val", n_val)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255)
                y, x = rng.integers(0, size // 2, 2)
                pixels[y : y + size // 3, x : x + size // 3] *= 0.5
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i:03d}.png")
    return root


COMMON = [
    "finetune.backbone=resnet10t",
    "finetune.batch_size=8",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.device=cpu",
]
IMAGENET = [
    *COMMON,
    "finetune.task=imagenet",
    "finetune.classify.img_size=32",
    "finetune.classify.epochs=4",
    "finetune.classify.optim.warmup_epochs=1",
]
LINEAR = [
    *COMMON,
    "finetune.task=linear",
    "finetune.linear.img_size=32",
    "finetune.linear.epochs=6",
    "finetune.linear.optim.warmup_epochs=1",
]


def _run(tmp_path: Path, root: Path, exp: str, *extra: str, **kwargs):  # noqa: ANN003, ANN202
    cfg = load_pipeline(
        REPO / "pipeline.yaml",
        [
            f"datasets.tiny.root={root}",
            "datasets.tiny.layout=imagefolder",
            "finetune.data=tiny",
            f"finetune.exp={exp}",
            f"finetune.out={tmp_path / 'runs'}",
            *extra,
        ],
    )
    return _run_finetune(resolve(cfg, "finetune"), progress=False, **kwargs)


def _losses(run_dir: Path) -> list[float]:
    from training.metrics import read_metrics

    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def _export(tmp_path: Path) -> Path:
    """What distill writes as backbone.safetensors: the student's weights in timm's own names."""
    torch.manual_seed(3)
    path = tmp_path / "backbone.safetensors"
    save_file(Backbone("resnet10t").timm_state_dict(), str(path))
    return path


def test_topk_against_a_hand_count() -> None:
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: ranked 5th of 6 -> top-5 hit only
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: ranked 6th -> miss
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # label 2: ties among the rest, not top-1
        ]
    )
    labels = torch.tensor([0, 1, 0, 2])
    top1, top5 = topk_correct(logits, labels).tolist()
    assert (top1, top5) == (1, 3)
    # fewer classes than k: top-5 is every sample
    assert topk_correct(torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])).tolist()[1] == 5


def test_evaluation_counts_match_a_hand_count_on_the_folder(tmp_path: Path) -> None:
    from finetune.classification import ClassFolder, list_samples

    root = write_imagefolder(tmp_path / "data", n_train=1, n_val=3)
    classes = find_classes(root, "train")
    samples = list_samples(root, "val", classes)
    # a "model" that answers from the mean colour channel: red -> 0? classes sort as blue, green, red
    assert classes == ["blue", "green", "red"]

    class ByColour(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            mean_B3 = x.mean(dim=(2, 3))  # RGB order; class order blue, green, red = channels 2, 1, 0
            logits = mean_B3[:, [2, 1, 0]].clone()
            logits[2:4] = torch.tensor([[0.0, 0.0, 1.0]])  # make samples 2 and 3 (blue 2, green 0) wrong
            return logits

    dataset = ClassFolder(
        samples, lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
    )
    metrics = evaluate_classifier(
        ByColour(), dataset, Runtime(torch.device("cpu")), batch_size=4, progress=False
    )
    # 9 images; sample 2 (blue, answered red) and sample 3 (green, answered red) wrong at top-1; with 3 classes
    # top-5 is always right
    assert metrics["images"] == 9
    assert metrics["top1"] == pytest.approx(100 * 7 / 9)
    assert metrics["top5"] == pytest.approx(100.0)


@pytest.mark.parametrize("task", ["imagenet", "linear"])
def test_classification_trains_from_a_distill_export_and_resumes_exactly(tmp_path, monkeypatch, task) -> None:
    root = write_imagefolder(tmp_path / "data")
    ckpt = _export(tmp_path)
    recipe = IMAGENET if task == "imagenet" else LINEAR
    extra = [*recipe, f"finetune.ckpt={ckpt}", "finetune.checkpoint_every=3"]
    original_save = engine.save_checkpoint
    interrupted = tmp_path / "runs" / "b" / "checkpoint.pt"

    def save_and_keep_step_3(path, state):  # noqa: ANN001, ANN202 - a run killed right after step 3
        original_save(path, state)
        if state["step"] == 3 and Path(path).parent.name == "a":
            interrupted.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, interrupted)

    monkeypatch.setattr(engine, "save_checkpoint", save_and_keep_step_3)
    straight = _run(tmp_path, root, "a", *extra)
    out = tmp_path / "runs" / "a"
    for name in ("config.yaml", "results.json", "summary.md", "metrics.jsonl", "checkpoint.pt"):
        assert (out / name).is_file(), name
    steps = straight["steps"]
    assert steps == (4 if task == "imagenet" else 6) * (24 // 8)
    losses = _losses(out)
    assert len(losses) == steps
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert 0 <= straight["top1"] <= straight["top5"] == 100.0  # 3 classes: top-5 is everything
    # the backbone came from the export (timm names): its weights are the file's (linear: and stay frozen)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    exported = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(ckpt))
    prefix = "backbone.model." if task == "linear" else ""
    key = "conv1.0.weight"
    if task == "linear":
        torch.testing.assert_close(state[prefix + key], exported[key])
    else:
        assert not torch.equal(state[key], exported[key])  # fine-tuned
    # resume from the step-3 checkpoint: same weights and the same evaluation as the straight run
    resumed = _run(tmp_path, root, "b", *extra, resume=True)
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted, weights_only=True)
    assert a["step"] == b["step"] == steps
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert resumed["top1"] == straight["top1"]
    assert _losses(tmp_path / "runs" / "b")[-(steps - 3) :] == losses[3:]


def test_random_init_and_protocol_defaults(tmp_path) -> None:
    root = write_imagefolder(tmp_path / "data", n_train=4, n_val=1)
    result = _run(tmp_path, root, "rand", *LINEAR, "finetune.linear.epochs=1")
    assert result["steps"] == 1 and result["val_images"] == 3
    cfg = load_pipeline(REPO / "pipeline.yaml", ["finetune.task=imagenet"])
    ft = resolve(cfg, "finetune").finetune
    assert ft.data == "imagenet" and ft.batch_size == 2048
    c = ft.classify
    assert (c.epochs, c.img_size, c.crop_pct, c.loss, c.mixup, c.cutmix, c.repeats, c.ema_decay) == (
        300, 224, 0.95, "bce", 0.1, 1.0, 3, 0.0,
    )  # fmt: skip
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.auto_augment) == (
        "lamb", 5e-3, 0.02, "rand-m7-mstd0.5-inc1",
    )  # fmt: skip
    lin = resolve(load_pipeline(REPO / "pipeline.yaml", ["finetune.task=linear"]), "finetune").finetune
    assert lin.batch_size == 16384 and lin.linear.epochs == 90 and lin.linear.optim.name == "lars"


def test_a_flat_val_folder_is_refused_with_the_fix(tmp_path) -> None:
    root = write_imagefolder(tmp_path / "data", n_train=2, n_val=1)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "ILSVRC2012_val_00000001.png")
    with pytest.raises(ValueError, match=r"re-folder"):
        _run(tmp_path, root, "flat", *LINEAR)
