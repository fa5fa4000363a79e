"""Contract tests shared by every student: levels at strides 4/8/16/32, regressor shapes, weights round-trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from distill.model import DistillNet
from distill.student import STUDENT_STRIDES, build_student, torchvision_resnet_state_dict

STUDENTS = ["resnet18", "convnext_atto"]
TEACHER_CHANNELS = {"s4": 6, "s8": 10, "s16": 12, "s32": 14}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("name", STUDENTS)
def test_student_levels_and_regressor_shapes(name: str) -> None:
    torch.manual_seed(0)
    student = build_student(name)
    feats = student(torch.randn(2, 3, 32, 32))
    assert [f.shape[-1] for f in feats] == [32 // s for s in STUDENT_STRIDES]
    assert [f.shape[1] for f in feats] == student.channels
    net = DistillNet(student, TEACHER_CHANNELS, channels=16)
    out = net(torch.randn(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"s{s}": (2, TEACHER_CHANNELS[f"s{s}"], 32 // s, 32 // s) for s in STUDENT_STRIDES
    }


@pytest.mark.parametrize("name", STUDENTS)
def test_regressor_predicts_only_the_bank_levels(name: str) -> None:
    net = DistillNet(build_student(name), {"s8": 3, "s32": 5}, channels=8)
    assert sorted(net(torch.randn(2, 3, 32, 32))) == ["s32", "s8"]


@pytest.mark.parametrize("name", STUDENTS)
def test_student_weights_round_trip(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    first = build_student(name)
    path = tmp_path / "w.safetensors"
    save_file(first.timm_state_dict(), str(path))
    second = build_student(name, weights=str(path))
    for key, value in first.timm_state_dict().items():
        assert torch.equal(value, second.timm_state_dict()[key]), key


def test_student_without_the_strides_is_refused() -> None:
    with pytest.raises(ValueError, match="strides"):
        build_student("vit_tiny_patch16_224")


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(build_student("convnext_atto").timm_state_dict(), str(path))
    with pytest.raises(ValueError, match="different architecture"):
        build_student("resnet18", weights=str(path))


def test_torchvision_layout_for_resnet() -> None:
    state = build_student("resnet18").timm_state_dict()
    tv = torchvision_resnet_state_dict("resnet18", state)
    assert "layer4.1.bn2.running_var" in tv and "fc.weight" not in tv
    with pytest.raises(ValueError, match="torchvision"):
        torchvision_resnet_state_dict("convnext_atto", {})


@pytest.mark.parametrize("name", STUDENTS)
def test_student_state_dict_is_in_timm_names(name: str) -> None:
    # one backbone wrapper, one key spelling: the student's own keys are the plain timm model's (no key map)
    import timm

    student = build_student(name)
    with torch.device("meta"):
        reference = timm.create_model(name).state_dict()
    keys = set(student.state_dict())
    assert {k.removeprefix("model.") for k in keys} <= set(reference)
    assert all(k.startswith("model.") for k in keys)
    assert set(student.timm_state_dict()) == {k.removeprefix("model.") for k in keys}


@pytest.mark.parametrize(
    ("levels", "num_classes"), [({"s8": 3, "s16": 3, "s32": 5}, 0), ({"s32": 5}, 0), ({"s16": 2}, 4)]
)
def test_every_parameter_gets_a_gradient_on_a_level_subset(levels: dict[str, int], num_classes: int) -> None:
    # DDP runs without find_unused_parameters: a built but unused output conv fails its second step
    net = DistillNet(build_student("resnet18"), levels, channels=8, num_classes=num_classes)
    out = net(torch.randn(2, 3, 32, 32))
    sum(v.float().mean() for v in out.values()).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    assert sorted(out) == sorted([*levels, *(["logits"] if num_classes else [])])
