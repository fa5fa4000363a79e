"""Gradient accumulation (training/accumulate.py): an accumulated step equals the big-batch step.

Models without batch statistics (BatchNorm replaced by Identity here) match to float precision; with BatchNorm the
statistics are per micro-batch, so only approximately (the caveat in training/accumulate.py and docs/distill.md).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from training.accumulate import accumulate_backward, split_batch

REPO = Path(__file__).resolve().parents[1]


def _without_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_bn(child)
    return module


def test_split_batch_slices_nested_batches_and_refuses_uneven_splits() -> None:
    batch = {"image": torch.arange(8).view(4, 2), "targets": {"s8": {"q": torch.arange(4)}}, "n": 7}
    parts = split_batch(batch, 2)
    assert [p["image"].tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert [p["targets"]["s8"]["q"].tolist() for p in parts] == [[0, 1], [2, 3]]
    assert parts[1]["n"] == 7
    images, targets = split_batch((["a", "b", "c", "d"], [{"k": 1}, {"k": 2}, {"k": 3}, {"k": 4}]), 2)[1]
    assert images == ["c", "d"] and targets == [{"k": 3}, {"k": 4}]
    with pytest.raises(ValueError, match="per-rank batch of 4 is not divisible by accum_steps=3"):
        split_batch(batch, 3)


def test_ddp_gradient_sync_is_skipped_on_all_but_the_last_micro_batch() -> None:
    class FakeDDP(nn.Linear):
        entered = 0

        @contextlib.contextmanager
        def no_sync(self):  # noqa: ANN202
            FakeDDP.entered += 1
            yield

    model = FakeDDP(3, 1)
    accumulate_backward(model, torch.randn(8, 3), 4, lambda x: {"loss": model(x).square().mean()})
    assert FakeDDP.entered == 3


def _distill_trainer(accum: int, net: nn.Module):  # noqa: ANN202
    from distill.trainer import StepSettings, Trainer
    from training.runtime import Runtime

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    class Flat:
        def step_update(self, step: int) -> None:
            pass

    def targets(batch: dict) -> dict[str, torch.Tensor]:
        return {"s8": batch["t8"], "s16": batch["t16"]}

    settings = StepSettings(whiten="sample", at_weight=10.0, accum_steps=accum)
    return Trainer(net, net, optimizer, Flat(), targets, settings, Runtime(torch.device("cpu")))


def test_accumulated_distill_step_equals_the_big_batch_step() -> None:
    from distill.model import DistillNet
    from distill.student import build_student

    torch.manual_seed(0)
    net = _without_bn(DistillNet(build_student("resnet10t"), {"s8": 4, "s16": 6}, channels=16))
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
        "t8": torch.randn(8, 4, 4, 4, generator=g),
        "t16": torch.randn(8, 6, 2, 2, generator=g),
    }
    big, small = copy.deepcopy(net), copy.deepcopy(net)
    trainer_big, trainer_acc = _distill_trainer(1, big), _distill_trainer(4, small)
    trainer_big.train_step(batch)
    trainer_acc.train_step(batch)
    (values_big,), (values_acc,) = trainer_big.flush(), trainer_acc.flush()
    for key in ("loss", "mse", "at", "mse/s8", "at/s16"):
        assert values_acc[key] == pytest.approx(values_big[key], rel=1e-5), key
    for (name, a), b in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    # the counters see one optimizer step, not four
    assert values_acc["lr"] == values_big["lr"]


def test_accumulated_finetune_step_equals_the_big_batch_step(tmp_path: Path) -> None:
    from finetune.config import OptimConfig
    from finetune.engine import train_loop
    from training.metrics import MetricsLog
    from training.runtime import Runtime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for accum in (1, 3):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        history = train_loop(
            model=m,
            compute_losses=lambda mod, b: {"ce": nn.functional.cross_entropy(mod(b[0]), b[1])},
            batches=iter([(images, labels)] * 2),
            optimizer=opt,
            optim_cfg=OptimConfig(name="sgd", lr=0.5, warmup_iters=0),
            start=0,
            total=2,
            runtime=Runtime(torch.device("cpu")),
            log=MetricsLog(tmp_path / str(accum), enabled=False),
            checkpoint=tmp_path / f"{accum}.pt",
            checkpoint_every=100,
            log_every=100,
            accum_steps=accum,
        )
        results.append((history, m))
    (h1, m1), (h3, m3) = results
    assert h3 == pytest.approx(h1, rel=1e-5)
    for a, b in zip(m1.parameters(), m3.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_distill_batch_must_divide_into_ranks_and_micro_batches() -> None:
    from distill.config import DistillConfig

    with pytest.raises(ValueError, match="accum_steps must be >= 1"):
        DistillConfig(accum_steps=0)
