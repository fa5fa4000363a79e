"""Loss terms read on the host once per window: values, the non-finite stop, and no poisoned checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.deferred import DeferredTerms


def test_flush_returns_each_step_in_order_and_clears() -> None:
    terms = DeferredTerms()
    terms.add(3, {"loss": torch.tensor(1.5), "mse": torch.tensor([0.25]), "lr": 0.1})
    terms.add(4, {"loss": torch.tensor(2.0, dtype=torch.float64), "mse": torch.tensor(0.5), "lr": 0.2})
    assert len(terms) == 2
    assert terms.flush() == [
        {"loss": 1.5, "mse": 0.25, "lr": 0.1},
        {"loss": 2.0, "mse": 0.5, "lr": 0.2},
    ]
    assert len(terms) == 0 and terms.flush() == []


def test_first_non_finite_step_raises_with_all_its_terms_and_unchecked_terms_pass() -> None:
    terms = DeferredTerms(ValueError, "lower the lr")
    terms.add(
        0, {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(float("inf"))}, unchecked=["grad_norm"]
    )
    terms.add(1, {"loss": torch.tensor(float("nan")), "at": torch.tensor(2.0)})
    terms.add(2, {"loss": torch.tensor(float("inf")), "at": torch.tensor(3.0)})
    with pytest.raises(
        ValueError, match=r"^non-finite loss at step 1 in \['loss'\]; all terms: loss=nan, at=2; lower"
    ):
        terms.flush()


def test_finetune_loop_stops_at_the_next_log_boundary_before_saving_a_nan_model(tmp_path: Path) -> None:
    from finetune.config import OptimConfig
    from finetune.engine import train_loop
    from training.metrics import MetricsLog
    from training.runtime import Runtime

    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    batches = [torch.ones(4, 2)] * 8
    batches[2] = torch.full((4, 2), float("nan"))  # step 2 poisons the weights

    def losses(m: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l2": m(x).pow(2).mean()}

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(FloatingPointError, match=r"step 2 in \['loss', 'l2'\]"):
        train_loop(
            model=model, compute_losses=losses, batches=iter(batches),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), optim_cfg=OptimConfig(warmup_iters=0),
            start=0, total=8, runtime=Runtime(torch.device("cpu")), log=MetricsLog(tmp_path, tensorboard=False),
            checkpoint=ckpt, checkpoint_every=3, log_every=4, progress=False,
        )  # fmt: skip
    # the step-3 checkpoint would have held the NaN weights: the flush before it raised instead
    assert not ckpt.exists()
    assert torch.isnan(model.weight).all()  # (the weights really were poisoned)
