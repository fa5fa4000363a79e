"""``run_interpret``: train (or re-use) the feature interpreter, score it, write its soft labels into the bank.

Folder ``<interpret.out>/<interpret.exp>/``: ``config.yaml`` (resolved), ``interpreter.safetensors`` (weights +
config + provenance; its sha256 is the identity the bank records), ``metrics.jsonl`` (loss per epoch),
``results.json`` (test mIoU), ``checkpoint.pt`` while training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from configlib import atomic_write_text, save_resolved
from interpret.inputs import InterpretInputs
from interpret.train import Features, evaluate_interpreter, load_labelled, train_interpreter
from teachers.interpreter import (
    FeatureInterpreter,
    InterpreterConfig,
    file_sha256,
    load_interpreter,
    save_interpreter,
)
from training.checkpoint import CHECKPOINT_NAME
from training.runtime import resolve_device, seed_everything

log = logging.getLogger(__name__)

INTERPRETER_FILE = "interpreter.safetensors"
RESULTS_FILE = "results.json"
WRITE_BATCH = 16
"""Rows per interpreter forward while writing soft labels (a shard's features at ADM-256 are ~0.5 GB)."""


def bank_features(encoder: Any, levels: list[str], seed: int) -> Features:
    """The bank's read-out as the interpreter's feature source: fresh noise per (key, visit, flip)."""
    from teachers.encoding import fresh_seed, make_noise

    def features(
        images_u8: torch.Tensor, keys: list[str], flips: list[int], visit: int
    ) -> dict[str, torch.Tensor]:
        x0_BCHW = images_u8.float() / 127.5 - 1.0
        eps_BCHW = None
        if (
            encoder.mode == "noise"
        ):  # the views' pixels are mirrored already: a fresh draw each, nothing to mirror
            seeds = [fresh_seed(seed, key, visit, flip) for key, flip in zip(keys, flips, strict=True)]
            eps_BCHW = make_noise(seeds, [False] * len(seeds), encoder.noise_shape)
        feats = encoder(x0_BCHW, eps_BCHW)
        return {name: feats[name].clone() for name in levels}  # clone: out of inference mode, for autograd

    return features


def run_interpret(
    inputs: InterpretInputs, *, retrain: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train or load the interpreter, score it on the test split, write the bank's soft labels (resumes)."""
    from bank import Bank
    from sources.datasets import ensure_available
    from sources.segmentation import fewshot_class_names
    from teachers.provenance import Provenance

    icfg = inputs.interpret
    run_dir = Path(icfg.out) / icfg.exp
    device = resolve_device(icfg.device, "interpret.device")
    seed_everything(icfg.seed)

    # 1. the bank: the levels the interpreter reads and the read-out that made them
    bank = Bank.open(icfg.bank)
    by_name = {lv.name: lv for lv in bank.levels}
    levels = list(icfg.levels) or list(by_name)
    unknown = [name for name in levels if name not in by_name]
    if unknown:
        raise ValueError(f"interpret.levels asks for {unknown}; the bank {bank.path} has {sorted(by_name)}")
    if bank.spec.image_size % icfg.stride:
        raise ValueError(
            f"interpret.stride={icfg.stride} does not divide the bank's image size {bank.spec.image_size}"
        )
    provenance = Provenance.from_dict(bank.spec.attributes)

    # 2. the interpreter: re-used when this run folder holds one, else trained on the labelled split and scored
    model_path, results_path = run_dir / INTERPRETER_FILE, run_dir / RESULTS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(inputs, run_dir)
    if retrain:
        for stale in (model_path, results_path, run_dir / CHECKPOINT_NAME):
            stale.unlink(missing_ok=True)
    if model_path.is_file() and results_path.is_file():
        model, _ = load_interpreter(model_path, device)
        results = json.loads(results_path.read_text()) | {"sha256": file_sha256(model_path)}
        want = {name: by_name[name].channels for name in levels}
        if model.cfg.level_channels != want:
            raise ValueError(
                f"{model_path} reads levels {model.cfg.level_channels}, the bank {bank.path} has {want}; "
                "pass --retrain (or interpret.exp=NEW) to train one for this bank's read-out"
            )
        log.info(
            "interpreter: re-using %s (test mIoU %.2f); --retrain trains a new one",
            model_path,
            results["mIoU"],
        )
    else:
        root = ensure_available(icfg.data, inputs.dataset)
        names = fewshot_class_names(root, icfg.num_classes)
        resolution = bank.spec.image_size
        train_set = load_labelled(root, "train", resolution, len(names))
        test_set = load_labelled(root, "test", resolution, len(names))
        encoder = provenance.rebuild_encoder(inputs.teachers, device, levels=levels, purpose="interpret")
        features = bank_features(encoder, levels, icfg.seed)
        model = FeatureInterpreter(
            InterpreterConfig(
                level_channels={name: by_name[name].channels for name in levels},
                level_strides={name: by_name[name].stride for name in levels},
                num_classes=len(names),
                channels=icfg.channels,
                dropout=icfg.dropout,
                class_names=names,
            )
        ).to(device)
        train_terms = train_interpreter(
            model, features, train_set, icfg, run_dir, device=device, progress=progress
        )
        metrics = evaluate_interpreter(model, features, test_set, device=device)
        results = {
            "mIoU": metrics["mIoU"],
            "mAcc": metrics["mAcc"],
            "aAcc": metrics["aAcc"],
            "IoU": metrics["IoU"],
            "classes": names,
            "train_images": len(train_set.keys),
            "test_images": len(test_set.keys),
            "final_train_loss": train_terms,
            "data": icfg.data,
            "bank_fingerprint": bank.fingerprint,
        }
        extra = {k: results[k] for k in ("mIoU", "data", "train_images", "bank_fingerprint")}
        sha256 = save_interpreter(model, model_path, extra=extra)
        atomic_write_text(results_path, json.dumps(results, indent=2))
        (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
        results["sha256"] = sha256

    # 3. soft labels for every bank row, shard by shard (resumes; kill-safe)
    identity = {
        "sha256": results["sha256"],
        "classes": model.cfg.class_names,
        "levels": levels,
        "data": results["data"],
        "test_mIoU": round(float(results["mIoU"]), 4),
    }
    spec = write_soft_labels(bank, model, identity, icfg.stride, icfg.codec, device=device,
                             overwrite=overwrite, progress=progress)  # fmt: skip
    results["labels"] = spec.to_dict()
    return results


@torch.no_grad()
def write_soft_labels(
    bank: Any,
    model: FeatureInterpreter,
    identity: dict[str, Any],
    stride: int,
    codec: str,
    *,
    device: torch.device,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """The interpreter's logits of every training view of the bank, from that view's own stored features
    (decoded as distill decodes them: a mirrored bank's flipped view from the mirrored features), at
    ``image_size / stride``; returns the ``bank.LabelsSpec``. Deterministic (eval mode, fixed batches), so a
    re-run after a kill writes the same bytes."""
    import torch.nn.functional as F

    from bank import BankTrainSet, LabelsSpec, LabelsWriter, decode_targets

    model.eval()
    size = bank.spec.image_size // stride
    spec = LabelsSpec(
        num_classes=model.cfg.num_classes,
        height=size,
        width=size,
        stride=stride,
        codec=codec,
        interpreter=identity,
    )
    writer = LabelsWriter.open(bank.path, spec, overwrite=overwrite)
    pending = writer.pending_shards()
    views_set = BankTrainSet(
        bank.path, model.levels
    )  # views -> stored rows (+ mirror), as distill reads them
    projections = {name: p.to(device) for name, p in bank.projections.items()}
    for shard in tqdm(pending, desc="interpret: soft labels", unit="shard", disable=not progress):
        views = list(writer.views(shard))
        chunks = []
        for begin in range(0, len(views), WRITE_BATCH):
            batch = views_set.__getitems__(views[begin : begin + WRITE_BATCH])
            feats = decode_targets(batch["targets"], device, mirror=batch["mirror"], projections=projections)
            logits_BKhw = model(feats)
            if logits_BKhw.shape[-2:] != (size, size):
                logits_BKhw = F.interpolate(
                    logits_BKhw, size=(size, size), mode="bilinear", align_corners=False
                )
            chunks.append(logits_BKhw)
        writer.write_shard(shard, torch.cat(chunks))
    return spec
