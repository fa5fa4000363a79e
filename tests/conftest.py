"""Shared test setup: GPU-marked tests are skipped (never passed) without CUDA; small thread counts; the bank
reader's two file paths as a fixture."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker); not counted as passed on CPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["chunked", "whole"])
def small_files(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The bank reader's two file paths: chunk by chunk (threshold 0), or small files read whole at open (what
    the tests' small banks get by default; ``bank.layout.SMALL_SHARD_FILE``)."""
    if request.param == "chunked":
        from bank import layout

        monkeypatch.setattr(layout, "SMALL_SHARD_FILE", 0)
    return request.param
