"""The feature bank: the one on-disk contract between ``encode`` (writer) and ``distill`` (reader).

Names are imported lazily (PEP 562) so that ``import bank.config`` -- done by the config loader before any
stage runs -- does not import torch or zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "FORMAT_VERSION": "bank.spec",
    "BankError": "bank.spec",
    "LevelSpec": "bank.spec",
    "BankSpec": "bank.spec",
    "ShardRows": "bank.writer",
    "BankWriter": "bank.writer",
    "Claim": "bank.writer",
    "side_dir": "bank.layout",
    "SUMMARY_FILE": "bank.layout",
    "BankFormatWarning": "bank.reader",
    "spec_from_config": "bank.writer",
    "Bank": "bank.reader",
    "BankTrainSet": "bank.dataset",
    "collate_rows": "bank.dataset",
    "decode_targets": "bank.dataset",
    "make_loader": "bank.dataset",
    "EpochSampler": "bank.sampler",
    "CODECS": "bank.codecs",
    "make_codec": "bank.codecs",
    "pca_rgb": "bank.viz",
    "LabelsSpec": "bank.labels",
    "LabelsWriter": "bank.labels",
    "decode_labels": "bank.dataset",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bank' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
