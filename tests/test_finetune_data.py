"""Finetune data + evaluators: real layouts, ground truth as prediction, bad-data errors, lr schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from finetune_data import write_ade20k, write_coco, write_fewshot
from PIL import Image

from finetune.ade20k import ade20k_class_names, ade20k_pairs
from finetune.coco import CocoInstances, evaluate_coco, load_coco, to_coco_results
from finetune.config import OptimConfig, SegAugConfig
from finetune.optim import lr_factor
from finetune.seg_data import SegmentationDataset
from sources.segmentation import fewshot_class_names, fewshot_pairs, load_pair
from training.seg_metrics import ConfusionMatrix

AUG = SegAugConfig(scale=(64, 48), crop_size=32)


def test_confusion_matrix_matches_hand_computed_values():
    pred = torch.tensor([[0, 0, 1], [1, 2, 2]])
    label = torch.tensor([[0, 1, 1], [1, 2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(pred, label)
    m = cm.compute()
    # class 0: TP1 FP1 FN0 -> IoU 1/2; class 1: TP2 FP0 FN1 -> 2/3; class 2: TP1 FP0 FN0 -> 1
    assert m["IoU"] == pytest.approx([50.0, 200 / 3, 100.0])
    assert m["mIoU"] == pytest.approx((50.0 + 200 / 3 + 100.0) / 3)
    assert m["Acc"] == pytest.approx([100.0, 200 / 3, 100.0])
    assert m["aAcc"] == pytest.approx(80.0)


def test_absent_class_is_nan_and_skipped():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    m = cm.compute()
    assert math.isnan(m["IoU"][2]) and m["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize("task", ["ade20k", "fewshot"])
def test_ground_truth_as_prediction_gives_miou_100(tmp_path, task):
    if task == "ade20k":
        root = write_ade20k(tmp_path)
        pairs, names, reduce = ade20k_pairs(root, "val"), ade20k_class_names(root, 0), True
    else:
        root = write_fewshot(tmp_path)
        pairs, names, reduce = fewshot_pairs(root, "test"), fewshot_class_names(root, 0), False
    dataset = SegmentationDataset(pairs, len(names), AUG, train=False, reduce_zero_label=reduce)
    cm = ConfusionMatrix(len(names))
    for i in range(len(dataset)):
        label = dataset[i]["label"]
        assert (label == 255).any()  # ADE "other" / few-shot ignore pixels exist and are skipped
        cm.update(label.clone(), label)
    m = cm.compute()
    assert m["mIoU"] == pytest.approx(100.0) and m["aAcc"] == pytest.approx(100.0)


def test_ade_reduce_zero_label_and_class_names(tmp_path):
    root = write_ade20k(tmp_path, num_classes=4)
    pair = ade20k_pairs(root, "train")[0]
    raw = np.asarray(Image.open(pair.label)).astype(np.int64)
    _, label = load_pair(pair, 4, reduce_zero_label=True)
    assert torch.equal(
        label[torch.from_numpy(raw == 0)], torch.full_like(label[torch.from_numpy(raw == 0)], 255)
    )
    assert torch.equal(label[torch.from_numpy(raw > 0)], torch.from_numpy(raw[raw > 0] - 1))
    assert ade20k_class_names(root, 0) == ["thing0", "thing1", "thing2", "thing3"]


def test_train_augmentation_shapes_and_replay(tmp_path):
    root = write_ade20k(tmp_path)
    dataset = SegmentationDataset(ade20k_pairs(root, "train"), 4, AUG, train=True, reduce_zero_label=True)
    a, b = dataset[(1, 123)], dataset[(1, 123)]
    assert a["image"].shape == (3, 32, 32) and a["label"].shape == (32, 32)
    assert torch.equal(a["image"], b["image"]) and torch.equal(
        a["label"], b["label"]
    )  # same seed, same sample
    values = set(a["label"].unique().tolist())
    assert values <= {0, 1, 2, 3, 255}


def test_missing_annotation_names_the_file(tmp_path):
    root = write_ade20k(tmp_path)
    victim = sorted((root / "ADEChallengeData2016/annotations/training").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        ade20k_pairs(root, "train")


def test_label_out_of_range_names_the_file(tmp_path):
    root = write_fewshot(tmp_path)
    pair = fewshot_pairs(root, "train")[0]
    label = np.load(pair.label)
    label[5, 5] = 9
    np.save(pair.label, label)
    with pytest.raises(ValueError, match=f"{pair.label.name}.*outside 0..2"):
        load_pair(pair, 3, reduce_zero_label=False)


def test_image_mask_size_mismatch_names_both_files(tmp_path):
    root = write_ade20k(tmp_path)
    pair = ade20k_pairs(root, "val")[0]
    Image.open(pair.image).resize((40, 48)).save(pair.image)
    with pytest.raises(ValueError, match=f"{pair.label.name}.*{pair.image.name}"):
        load_pair(pair, 4, reduce_zero_label=True)


def _gt_as_outputs(dataset: CocoInstances):
    outputs, ids = [], []
    for image_id in dataset.ids:
        anns = [a for a in dataset.coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ],
            dtype=torch.float32,
        ).reshape(-1, 4)
        masks = [torch.from_numpy(dataset.coco.annToMask(a)).float() for a in anns]
        info = dataset.coco.imgs[image_id]
        outputs.append(
            {
                "boxes": boxes,
                "labels": torch.tensor(
                    [dataset.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64
                ),
                "scores": torch.ones(len(anns)),
                "masks": torch.stack(masks)[:, None]
                if masks
                else torch.zeros(0, 1, info["height"], info["width"]),
            }
        )
        ids.append(image_id)
    return outputs, ids


def test_coco_ground_truth_as_prediction_gives_ap_1(tmp_path):
    root = write_coco(tmp_path)
    val = CocoInstances(root, "val", train=False)
    assert len(val) == 3  # the image without annotations is kept for evaluation
    outputs, ids = _gt_as_outputs(val)
    results = to_coco_results(outputs, ids, val.cat_ids)
    assert {r["category_id"] for r in results} <= {3, 7}
    metrics = evaluate_coco(val.coco, json.loads(json.dumps(results)))
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert metrics["bbox_AP50"] == pytest.approx(100.0) and metrics["segm_AP75"] == pytest.approx(100.0)


def test_coco_training_targets_skip_crowd_and_filter_empty(tmp_path):
    root = write_coco(tmp_path)
    kept = CocoInstances(root, "train", train=True, flip_prob=0.0, filter_empty=False)
    filtered = CocoInstances(root, "train", train=True, flip_prob=0.0, filter_empty=True)
    assert len(kept) == 4 and len(filtered) == 3
    image, target = kept[1]  # image with a crowd region: 2 instances, crowd not among them
    assert target["boxes"].shape == (2, 4) and target["masks"].shape == (2, 64, 64)
    assert target["masks"].sum(dim=(1, 2)).tolist() == pytest.approx(
        (
            (target["boxes"][:, 2] - target["boxes"][:, 0]) * (target["boxes"][:, 3] - target["boxes"][:, 1])
        ).tolist()
    )
    _, empty = kept[3]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)
    # RLE instance (image 0, second object) decodes to its box.
    _, first = kept[0]
    assert int(first["masks"][1].sum()) == int(
        (first["boxes"][1, 2] - first["boxes"][1, 0]) * (first["boxes"][1, 3] - first["boxes"][1, 1])
    )


def test_coco_flip_moves_boxes_with_masks(tmp_path):
    root = write_coco(tmp_path)
    flipped = CocoInstances(root, "train", train=True, flip_prob=1.0, filter_empty=False)
    plain = CocoInstances(root, "train", train=True, flip_prob=0.0, filter_empty=False)
    (_, a), (_, b) = flipped[(0, 0)], plain[(0, 0)]
    assert torch.equal(a["masks"], b["masks"].flip(-1))
    assert torch.allclose(a["boxes"][:, [0, 2]], 64 - b["boxes"][:, [2, 0]])


def test_coco_bad_category_and_missing_file(tmp_path):
    root = write_coco(tmp_path)
    ann_file = root / "annotations/instances_val2017.json"
    payload = json.loads(ann_file.read_text())
    payload["annotations"][0]["category_id"] = 99
    ann_file.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="instances_val2017.json.*category_id 99"):
        load_coco(ann_file)
    (root / "annotations/instances_train2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        CocoInstances(root, "train", train=True)


def test_lr_schedules():
    poly = OptimConfig(lr=1.0, warmup_iters=10, warmup_ratio=0.0, poly_power=1.0)
    assert lr_factor(0, 100, poly) == pytest.approx(0.0)
    assert lr_factor(5, 100, poly) == pytest.approx(0.95 * 0.5)
    assert lr_factor(50, 100, poly) == pytest.approx(0.5)
    step = OptimConfig(schedule="step", warmup_iters=0, milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, 100, step) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_step_sampler_ranks_split_each_global_batch_and_every_epoch_covers_the_data():
    from training.sampler import StepBatchSampler

    one = list(StepBatchSampler(6, 4, total=3, start=0, seed=5))
    ranks = [list(StepBatchSampler(6, 4, total=3, start=0, seed=5, rank=r, world=2)) for r in range(2)]
    for step in range(3):  # rank 0 takes the first half of the global batch, rank 1 the second
        assert ranks[0][step] + ranks[1][step] == one[step]
    indices = [i for batch in one for i, _ in batch]
    assert sorted(indices[:6]) == sorted(indices[6:12]) == list(range(6))  # each epoch is a permutation
    assert len({s for batch in one for _, s in batch}) == 12  # one augmentation seed per position
    assert list(StepBatchSampler(6, 4, total=3, start=2, seed=5)) == one[2:]
    with pytest.raises(ValueError, match="finetune.batch_size=3 is not divisible by the 2 ranks"):
        StepBatchSampler(6, 3, total=1, start=0, seed=0, world=2, key="finetune.batch_size")
