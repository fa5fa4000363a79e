"""Finetune config defaults: the segmentation schedule follows the task's published protocol (paper.md)."""

from __future__ import annotations

import pytest

from configlib import ConfigError
from dreamteacher.schema import load_pipeline
from finetune.config import FinetuneConfig, SegmentationConfig


@pytest.mark.parametrize(
    ("task", "iters"),
    # paper.md, "Downstream protocols": ADE20K UperNet 160k iterations; label-efficient UperNet 20k iterations.
    [("ade20k", 160_000), ("fewshot", 20_000)],
)
def test_segmentation_schedule_without_explicit_iters_is_the_tasks_protocol(task, iters):
    assert FinetuneConfig(task=task).segmentation.iters == iters
    # The shipped pipeline.yaml must not pin one task's schedule for the other.
    cfg = load_pipeline("pipeline.yaml", [f"finetune.task={task}"])
    assert cfg.finetune.segmentation.iters == iters


def test_explicit_segmentation_iters_win_over_the_protocol():
    cfg = load_pipeline("pipeline.yaml", ["finetune.task=fewshot", "finetune.segmentation.iters=500"])
    assert cfg.finetune.segmentation.iters == 500
    assert FinetuneConfig(task="ade20k", segmentation=SegmentationConfig(iters=7)).segmentation.iters == 7


def test_negative_segmentation_iters_are_a_config_error():
    with pytest.raises(ConfigError, match=r"finetune\.segmentation\.iters"):
        load_pipeline("pipeline.yaml", ["finetune.segmentation.iters=-1"])
