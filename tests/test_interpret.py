"""Label distillation: the feature interpreter (shapes, its CE + Dice loss by hand, its file), the soft labels
``dreamteacher interpret`` writes (each view's from its own features, deterministic re-writes), and L_mix by hand
through the distill step. The whole stage runs end to end in tests/test_demo.py (interpret + mix distill)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from bank_helpers import write_bank
from torch import nn

from bank import Bank, decode_labels, decode_targets
from bank.config import BankConfig
from bank.layout import side_dir
from interpret.run import write_soft_labels
from teachers.interpreter import (
    FeatureInterpreter,
    InterpreterConfig,
    dice_loss,
    file_sha256,
    interpreter_loss,
    load_interpreter,
    save_interpreter,
)

# the helper banks' levels: s8 6 x 4 x 4 and s4 4 x 8 x 8 (16 px images)
HELPER_LEVELS = {"s8": 6, "s4": 4}


def make_interpreter(num_classes: int = 3, seed: int = 0) -> FeatureInterpreter:
    torch.manual_seed(seed)
    cfg = InterpreterConfig(
        level_channels=HELPER_LEVELS,
        level_strides={"s8": 4, "s4": 2},
        num_classes=num_classes,
        channels=32,
        class_names=[f"c{k}" for k in range(num_classes)],
    )
    return FeatureInterpreter(cfg).eval()


def test_interpreter_maps_every_level_to_logits_at_the_finest_grid() -> None:
    model = make_interpreter(num_classes=5)
    assert model.levels == ["s4", "s8"]  # finest first
    feats = {"s8": torch.randn(2, 6, 4, 4), "s4": torch.randn(2, 4, 8, 8)}
    assert model(feats).shape == (2, 5, 8, 8)
    # GroupNorm(32) over the fused channels, SiLU, and a 3x3 depthwise conv: the paper's fuse block
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"GroupNorm", "SiLU", "Dropout"} <= kinds
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size == (3, 3)
               for m in model.modules())  # fmt: skip
    # each sample's features are normalised on their own: scaling one sample changes nothing
    scaled = {name: f * torch.tensor([1.0, 50.0])[:, None, None, None] for name, f in feats.items()}
    torch.testing.assert_close(model(scaled), model(feats), rtol=1e-4, atol=1e-4)


def test_ce_and_dice_against_a_hand_computation() -> None:
    # three pixels: A logits (0, ln 3) label 1 -> p = (1/4, 3/4); B logits (0, 0) label 0 -> p = (1/2, 1/2);
    # C is unlabelled (255) and must count nowhere, whatever its logits
    logits = torch.tensor([[[[0.0, 0.0, 9.0]], [[math.log(3.0), 0.0, -9.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[1, 0, 255]]])
    # class 0: inter = p0(B) = 1/2, total = (1/4 + 1/2) + 1 -> (2 * 1/2 + 1) / (7/4 + 1)
    # class 1: inter = p1(A) = 3/4, total = (3/4 + 1/2) + 1 -> (2 * 3/4 + 1) / (9/4 + 1)
    dice = 1.0 - (2.0 / 2.75 + 2.5 / 3.25) / 2
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(dice_loss(logits, labels)) == pytest.approx(dice, rel=1e-6)
    terms = interpreter_loss(logits, labels, dice_weight=3.0)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(ce + 3.0 * dice, rel=1e-6)
    # a perfect, confident prediction scores ~0 on both
    sure = torch.tensor([[[[-20.0, 20.0, 0.0]], [[20.0, -20.0, 0.0]]]])
    assert float(interpreter_loss(sure, labels)["loss"]) == pytest.approx(0.0, abs=1e-6)


def test_interpreter_file_round_trip_and_identity(tmp_path: Path) -> None:
    model = make_interpreter()
    path = tmp_path / "interpreter.safetensors"
    sha = save_interpreter(model, path, extra={"mIoU": 12.5})
    assert sha == file_sha256(path) and len(sha) == 64
    loaded, extra = load_interpreter(path, sha256=sha)
    assert extra == {"mIoU": 12.5} and loaded.cfg == model.cfg and not loaded.training
    feats = {"s8": torch.randn(1, 6, 4, 4), "s4": torch.randn(1, 4, 8, 8)}
    torch.testing.assert_close(loaded(feats), model(feats), rtol=0, atol=0)
    with pytest.raises(ValueError, match="soft labels were written by 000000000000"):
        load_interpreter(path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="train one with `dreamteacher interpret`"):
        load_interpreter(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("mirror", [False, True], ids=["stored-flips", "mirrored-bank"])
def test_each_views_soft_labels_come_from_that_views_features(tmp_path: Path, mirror: bool) -> None:
    path = tmp_path / "b.zarr"
    if mirror:
        write_bank(path, BankConfig(shard_rows=4, codec="fp16"), flips=1, mirror=True)
    else:
        write_bank(path, BankConfig(shard_rows=8, codec="fp16"))
    bank, model = Bank.open(path), make_interpreter()
    spec = write_soft_labels(
        bank, model, {"sha256": "x"}, 2, "fp16", device=torch.device("cpu"), progress=False
    )
    bank = Bank.open(path)
    assert bank.labels == spec and (spec.height, spec.width) == (8, 8)
    # an image's unflipped and flipped view: for a mirrored bank, row 3 and its mirror (views 6 and 7, the
    # flipped one's features the mirror of row 3's); with stored flips, rows 2 and 3 (flip 0 and 1, the flipped
    # one's features the teacher's of the mirrored pixels)
    rows = [3, 3] if mirror else [2, 3]
    flip = torch.tensor([False, True]) if mirror else None
    batch = bank.read_rows(
        rows, list(HELPER_LEVELS), mirror=None if flip is None else flip.numpy(), labels=True
    )
    feats = decode_targets({lv: {p: torch.from_numpy(a) for p, a in parts.items()}
                            for lv, parts in batch["targets"].items()}, "cpu", mirror=flip)  # fmt: skip
    if mirror:
        torch.testing.assert_close(feats["s4"][1], feats["s4"][0].flip(-1))
    with torch.no_grad():
        expected = model(feats)
    got = decode_labels({p: torch.from_numpy(a) for p, a in batch["labels"].items()}, "cpu")
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # fp16 storage
    # and NOT the mirrored logits of the unflipped view: the interpreter is not mirror-equivariant
    assert (got[1] - got[0].flip(-1)).abs().max() > 1e-2


def test_rewriting_a_shards_soft_labels_gives_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "b.zarr"
    write_bank(path)
    model, cpu = make_interpreter(), torch.device("cpu")
    write_soft_labels(Bank.open(path), model, {"sha256": "x"}, 2, "int8", device=cpu, progress=False)
    files = {f: f.read_bytes() for f in sorted((path / "labels").rglob("*")) if f.is_file()}
    (side_dir(path) / "labels" / "done" / "000001.json").unlink()  # as after a kill inside shard 1
    assert Bank.open(path).labels is None
    write_soft_labels(Bank.open(path), model, {"sha256": "x"}, 2, "int8", device=cpu, progress=False)
    assert {f: f.read_bytes() for f in sorted((path / "labels").rglob("*")) if f.is_file()} == files
    assert Bank.open(path).labels is not None


# ---- L_mix through the distill step ------------------------------------------------------------------------------
class FixedOutputs(nn.Module):
    """A 'student' whose outputs are given tensors (plus a zero-weight parameter, so the step can run)."""

    def __init__(self, preds: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        super().__init__()
        self.preds, self.logits = preds, logits
        self.zero = nn.Parameter(torch.zeros(()))

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        return images_u8.float()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {name: p + self.zero for name, p in self.preds.items()}
        return out | {"logits": self.logits + self.zero}


def _mix_terms(student_logits: torch.Tensor, interpreter_logits: torch.Tensor, weight: float, tau: float):  # noqa: ANN202
    from distill.trainer import StepSettings, Trainer
    from training.runtime import Runtime

    # teacher features: +-1 in equal numbers per sample (mean 0, variance 1: whitening leaves them as they are)
    target = torch.ones(2, 4, 2, 2)
    target[:, :2] = -1.0
    net = FixedOutputs({"s8": torch.zeros(2, 4, 2, 2)}, student_logits)  # predicting zeros

    class Flat:
        def step_update(self, step: int) -> None:
            pass

    settings = StepSettings(whiten="sample", at_weight=10.0, label_weight=weight, label_temperature=tau)
    trainer = Trainer(net, net, torch.optim.SGD(net.parameters(), lr=0.0), Flat(), lambda b: {"s8": target},
                      settings, Runtime(torch.device("cpu")), labels=lambda b, t: interpreter_logits)  # fmt: skip
    trainer.train_step({"image": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)})
    (terms,) = trainer.flush()
    return terms


def test_mix_loss_against_a_hand_computation() -> None:
    # L_feat: predicting zeros for unit-variance targets is mse 1; the zero prediction's attention map is 0 and the
    # target's has norm 1, so AT = 1: L_feat = 1 + 10 * 1 = 11
    # L_ld: uniform student and interpreter over K = 3 classes -> cross-entropy ln 3 (tau changes nothing)
    zeros = torch.zeros(2, 3, 2, 2)
    terms = _mix_terms(zeros, zeros, weight=1.0, tau=4.0)
    assert terms["feat"] == pytest.approx(11.0, rel=1e-5)
    assert terms["label"] == pytest.approx(math.log(3.0), rel=1e-6)
    assert terms["loss"] == pytest.approx(11.0 + math.log(3.0), rel=1e-5)
    # tau = 4 softens the student's logits (0, 4 ln 3) to (0, ln 3): p = (1/4, 3/4); the interpreter is uniform
    # over K = 2, so L_ld = -(1/2 ln 1/4 + 1/2 ln 3/4); lambda = 0.5 weighs it, with no tau^2 factor
    student = torch.zeros(2, 2, 2, 2)
    student[:, 1] = 4 * math.log(3.0)
    terms = _mix_terms(student, torch.zeros(2, 2, 2, 2), weight=0.5, tau=4.0)
    ld = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert terms["label"] == pytest.approx(ld, rel=1e-6)
    assert terms["loss"] == pytest.approx(11.0 + 0.5 * ld, rel=1e-5)


def test_a_tiny_mix_distill_run_lowers_both_terms() -> None:
    from distill.model import DistillNet
    from distill.student import build_student
    from distill.trainer import StepSettings, Trainer
    from training.runtime import Runtime

    torch.manual_seed(0)
    net = DistillNet(build_student("resnet10t"), {"s8": 4, "s16": 6}, channels=16, num_classes=3)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)}
    targets = {"s8": torch.randn(4, 4, 4, 4, generator=g), "s16": torch.randn(4, 6, 2, 2, generator=g)}
    soft = torch.randn(4, 3, 8, 8, generator=g) * 4  # the interpreter's logits at stride 4

    class Flat:
        def step_update(self, step: int) -> None:
            pass

    settings = StepSettings(whiten="sample", at_weight=10.0, label_weight=1.0, label_temperature=4.0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    trainer = Trainer(net, net, optimizer, Flat(), lambda b: targets, settings, Runtime(torch.device("cpu")),
                      labels=lambda b, t: soft)  # fmt: skip
    for _ in range(30):
        trainer.train_step(batch)
    terms = trainer.flush()
    first, last = terms[0], terms[-1]
    assert last["feat"] < 0.8 * first["feat"], (first["feat"], last["feat"])
    assert last["label"] < first["label"] - 0.01, (first["label"], last["label"])
    # the label term's floor is the interpreter's own entropy at tau: what is left is above it
    floor = float(-(torch.softmax(soft / 4, 1) * torch.log_softmax(soft / 4, 1)).sum(1).mean())
    assert last["label"] >= floor - 1e-4
