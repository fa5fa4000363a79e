"""``run_finetune`` end to end on tiny data in the real layouts: artifacts, resume equivalence, eval-only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from finetune_data import write_ade20k, write_coco

from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from finetune import engine
from finetune.run import run_finetune as _run_finetune

SEG = [
    "finetune.backbone=resnet18",
    "finetune.batch_size=2",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.segmentation.aug.crop_size=32",
    "finetune.segmentation.aug.scale=[64,48]",
    "finetune.segmentation.head.channels=16",
    "finetune.segmentation.head.aux_channels=8",
    "finetune.segmentation.optim.warmup_iters=1",
    "finetune.segmentation.optim.lr=0.001",
    "finetune.vis_samples=2",
]


def run_finetune(cfg, **kwargs):  # noqa: ANN001, ANN003, ANN201 - the tests build whole pipeline configs
    """``run_finetune`` on ``resolve(cfg, "finetune")``, the inputs the CLI gives it."""
    return _run_finetune(resolve(cfg, "finetune"), **kwargs)


def _cfg(tmp_path, data_root, layout, exp, *extra):
    return load_pipeline(
        "pipeline.yaml",
        [
            f"datasets.tiny.root={data_root}",
            f"datasets.tiny.layout={layout}",
            "finetune.data=tiny",
            f"finetune.exp={exp}",
            f"finetune.out={tmp_path / 'runs'}",
            *extra,
        ],
    )


@pytest.mark.slow
def test_segmentation_run_writes_artifacts_and_resumes_exactly(tmp_path, monkeypatch):
    root = write_ade20k(tmp_path / "ade", n_train=4, n_val=2)
    original_save = engine.save_checkpoint
    interrupted = tmp_path / "runs" / "b" / "checkpoint.pt"

    def save_and_keep_step_2(path, state):  # simulates a run killed right after step 2
        original_save(path, state)
        if state["step"] == 2:
            interrupted.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, interrupted)

    monkeypatch.setattr(engine, "save_checkpoint", save_and_keep_step_2)
    four = [*SEG, "finetune.segmentation.iters=4", "finetune.checkpoint_every=2"]
    straight = run_finetune(_cfg(tmp_path, root, "ade20k", "a", *four), progress=False)
    out = tmp_path / "runs" / "a"
    for name in (
        "config.yaml",
        "results.json",
        "summary.md",
        "predictions.png",
        "metrics.jsonl",
        "checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["mIoU"] == pytest.approx(straight["mIoU"])
    assert set(results["metrics"]["per_class"]) == {"thing0", "thing1", "thing2", "thing3"}
    # Resume from the step-2 checkpoint to 4: the same weights as 4 steps straight.
    resumed = run_finetune(_cfg(tmp_path, root, "ade20k", "b", *four), resume=True, progress=False)
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/b/checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], msg=key)
    assert resumed["mIoU"] == pytest.approx(straight["mIoU"])
    # --eval-only reproduces the final evaluation from the checkpoint.
    again = run_finetune(_cfg(tmp_path, root, "ade20k", "a", *four), eval_only=True, progress=False)
    assert again["mIoU"] == pytest.approx(straight["mIoU"])


def test_slide_inference_on_label_efficient_layout(tmp_path):
    from finetune_data import write_fewshot

    root = write_fewshot(tmp_path / "fs", n_train=2, n_test=1)
    metrics = run_finetune(
        _cfg(
            tmp_path,
            root,
            "fewshot",
            "fs",
            *SEG,
            "finetune.task=fewshot",
            "finetune.segmentation.iters=1",
            "finetune.segmentation.eval.mode=slide",
            "finetune.segmentation.eval.crop_size=32",
            "finetune.segmentation.eval.stride=16",
        ),
        progress=False,
    )
    assert 0.0 <= metrics["mIoU"] <= 100.0 and len(metrics["per_class"]) == 3


def test_coco_run_writes_results_json(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=2, n_val=2)
    metrics = run_finetune(
        _cfg(
            tmp_path,
            root,
            "coco",
            "det",
            "finetune.task=coco",
            "finetune.backbone=resnet18",
            "finetune.batch_size=2",
            "finetune.num_workers=0",
            "finetune.detection.iters=2",
            "finetune.detection.train_min_sizes=[64]",
            "finetune.detection.max_size=64",
            "finetune.detection.fpn_channels=32",
            "finetune.detection.anchor_sizes=[8,16,32,64,128]",
            "finetune.detection.box_head_dim=64",
            "finetune.detection.mask_head_channels=16",
            "finetune.detection.detections_per_img=10",
            "finetune.detection.filter_empty_train=false",
            "finetune.detection.optim.warmup_iters=1",
        ),
        progress=False,
    )
    out = tmp_path / "runs" / "det"
    assert isinstance(json.loads((out / "coco_results.json").read_text()), list)
    assert metrics["steps"] == 2 and metrics["train_images"] == 2
    assert {"bbox_AP", "segm_AP", "segm_APl"} <= set(metrics)
    assert (out / "predictions.png").is_file() and (out / "summary.md").is_file()


def test_task_and_layout_mismatch_is_a_clear_error(tmp_path):
    root = write_ade20k(tmp_path / "ade", n_train=1, n_val=1)
    with pytest.raises(ValueError, match="needs a dataset with layout 'coco'"):
        run_finetune(_cfg(tmp_path, root, "ade20k", "x", "finetune.task=coco"), progress=False)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    # issue 18 item 13: it silently overwrote checkpoint.pt and appended to metrics.jsonl
    root = write_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    cfg = _cfg(tmp_path, root, "ade20k", "twice", *SEG, "finetune.segmentation.iters=1")
    run_finetune(cfg, progress=False)
    out = tmp_path / "runs" / "twice"
    checkpoint, metrics = (out / "checkpoint.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint.pt\); pass --resume"):
        run_finetune(cfg, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and (
        out / "metrics.jsonl"
    ).read_text() == metrics
    assert run_finetune(cfg, eval_only=True, progress=False)["steps"] == 1  # evaluating it stays allowed
    # a run that died before its first checkpoint cannot be resumed: a new run starts over, logs included
    (out / "checkpoint.pt").unlink()
    run_finetune(cfg, progress=False)
    assert (out / "metrics.jsonl").read_text().count('"train/loss"') == 1


def test_a_run_that_fails_to_start_leaves_no_config(tmp_path):
    root = write_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    missing = tmp_path / "missing.safetensors"
    cfg = _cfg(tmp_path, root, "ade20k", "bad", *SEG, f"finetune.ckpt={missing}")
    with pytest.raises(FileNotFoundError, match="finetune.ckpt"):
        run_finetune(cfg, progress=False)
    assert not (tmp_path / "runs" / "bad").exists()  # no config.yaml, not even the folder
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        run_finetune(_cfg(tmp_path, root, "ade20k", "bad", *SEG), resume=True, progress=False)
    assert not (tmp_path / "runs" / "bad" / "config.yaml").exists()
