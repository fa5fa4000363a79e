"""``resolve``: the one place where the pipeline config becomes each stage's fully derived inputs.

Every value that one setting derives from another is computed here and nowhere else:

* the dataset entry a stage reads (``encode.data``, ``finetune.data``, ``teacher_train.data``);
* the encode teacher: ``encode.teacher``, else the dataset's ``teacher``;
* the noise step T: ``encode.t``, else the dataset's ``t`` (the paper's per-dataset choice);
* the fine-tuning dataset: ``finetune.data``, else the task's (:data:`TASK_DATA`);
* the bank path: ``encode.bank`` / ``distill.bank`` / ``interpret.bank``, else ``banks/<encode.data>.zarr``
  (:func:`default_bank`);
* the interpreter file: ``distill.loss.interpreter``, else ``<interpret.out>/<interpret.exp>/interpreter.safetensors``
  with ``interpret.exp`` defaulting to ``interpret.data``.

Stages receive only their own section plus these inputs (``encode.inputs.EncodeInputs`` ...) and write them into
their run's ``config.yaml``, so a run folder says exactly what it was made with.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, overload

from configlib import ConfigError
from distill.inputs import DistillInputs
from dreamteacher.schema import PipelineConfig
from encode.inputs import EncodeInputs
from finetune.inputs import FinetuneInputs
from interpret.inputs import InterpretInputs
from teacher_training.inputs import TeacherTrainInputs
from teachers.registry import synthesizes

Stage = Literal["encode", "distill", "interpret", "finetune", "teacher"]


def default_bank(data: str) -> str:
    """Where ``make encode DATA=<data>`` puts its bank and ``make distill`` looks for it."""
    return f"banks/{data}.zarr"


def _encode(cfg: PipelineConfig) -> EncodeInputs:
    enc = cfg.encode
    dataset = cfg.dataset(enc.data)
    teacher_name = enc.teacher or dataset.teacher
    if not teacher_name:
        raise ConfigError(
            f"no teacher for dataset {enc.data!r}: set encode.teacher or datasets.{enc.data}.teacher "
            f"(teachers in the config: {', '.join(sorted(cfg.teachers))})"
        )
    t = enc.t or dataset.t
    if t <= 0 and not synthesizes(cfg.teacher(teacher_name)):  # a GAN synthesizes its rows: no noise step
        raise ConfigError(
            f"no noise step: set encode.t or datasets.{enc.data}.t (the paper: 150 ImageNet, 50 LSUN)"
        )
    resolved = dataclasses.replace(enc, teacher=teacher_name, t=t, bank=enc.bank or default_bank(enc.data))
    return EncodeInputs(encode=resolved, bank=cfg.bank, dataset=dataset, teacher=cfg.teacher(teacher_name))


def _interpret_config(cfg: PipelineConfig):  # noqa: ANN202 - InterpretConfig
    it = cfg.interpret
    return dataclasses.replace(it, bank=it.bank or default_bank(cfg.encode.data), exp=it.exp or it.data)


def interpreter_file(cfg: PipelineConfig) -> str:
    """Where ``dreamteacher interpret`` saves its interpreter (and online mix distillation looks for it)."""
    it = _interpret_config(cfg)
    return f"{it.out}/{it.exp}/interpreter.safetensors"


def _distill(cfg: PipelineConfig) -> DistillInputs:
    dcfg = cfg.distill
    loss = dataclasses.replace(dcfg.loss, interpreter=dcfg.loss.interpreter or interpreter_file(cfg))
    bank = dcfg.bank or default_bank(cfg.encode.data)
    return DistillInputs(distill=dataclasses.replace(dcfg, bank=bank, loss=loss), teachers=dict(cfg.teachers))


def _interpret(cfg: PipelineConfig) -> InterpretInputs:
    it = _interpret_config(cfg)
    return InterpretInputs(interpret=it, dataset=cfg.dataset(it.data), teachers=dict(cfg.teachers))


TASK_DATA: dict[str, str] = {
    "ade20k": "ade20k",
    "coco": "coco",
    "fewshot": "bedroom-28",
    "imagenet": "imagenet",
    "linear": "imagenet",
}
"""The dataset a fine-tuning task reads when ``finetune.data`` is empty (``make finetune TASK=imagenet``)."""


def _finetune(cfg: PipelineConfig) -> FinetuneInputs:
    ft = cfg.finetune
    if not ft.data:
        ft = dataclasses.replace(ft, data=TASK_DATA[ft.task])
    return FinetuneInputs(finetune=ft, dataset=cfg.dataset(ft.data))


def _teacher(cfg: PipelineConfig) -> TeacherTrainInputs:
    tc = cfg.teacher_train
    return TeacherTrainInputs(teacher_train=tc, dataset=cfg.dataset(tc.data))


@overload
def resolve(cfg: PipelineConfig, stage: Literal["encode"]) -> EncodeInputs: ...
@overload
def resolve(cfg: PipelineConfig, stage: Literal["distill"]) -> DistillInputs: ...
@overload
def resolve(cfg: PipelineConfig, stage: Literal["interpret"]) -> InterpretInputs: ...
@overload
def resolve(cfg: PipelineConfig, stage: Literal["finetune"]) -> FinetuneInputs: ...
@overload
def resolve(cfg: PipelineConfig, stage: Literal["teacher"]) -> TeacherTrainInputs: ...


def resolve(
    cfg: PipelineConfig, stage: Stage
) -> EncodeInputs | DistillInputs | InterpretInputs | FinetuneInputs | TeacherTrainInputs:
    """The inputs of ``stage``; an unknown dataset / teacher name or a missing T is a ``ConfigError``.

    Only the requested stage is resolved, so ``make distill`` does not fail on an encode-only setting.
    """
    resolvers = {"encode": _encode, "distill": _distill, "interpret": _interpret, "finetune": _finetune,
                 "teacher": _teacher}  # fmt: skip
    if stage not in resolvers:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(resolvers)}")
    return resolvers[stage](cfg)
