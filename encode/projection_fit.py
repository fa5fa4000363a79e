"""The projection fit (``bank.projection``): PCA bases per level from a fixed sample, before the first shard.

It runs in the driver process, before any shard task is dispatched (with dask too): the bases must be in the bank
when it is created, and they are small (k x C floats per level). The sample's read-outs are computed by the shard
task's own code (:func:`encode.worker.encode_rows`: decoding, preprocessing, views, noise seeds, teacher), on the
driver's ``encode.device`` (``auto``: its GPU when it has one), so the fit sees exactly what the rows will hold:
evenly spaced images of the key-sorted dataset, draw 0, every stored flip view. A resumed encode reuses the bases
stored in the bank (:func:`bank.projection.stored_projections`) instead of fitting again.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from bank.config import BankConfig
from bank.projection import (
    CovarianceAccumulator,
    Projection,
    energy_levels,
    projected_levels,
    sample_indices,
    stored_projections,
    with_projections,
)
from bank.spec import BankError, BankSpec
from encode.worker import ShardStats, ShardTask, clear_caches, encode_rows
from teachers.registry import synthesizes

log = logging.getLogger(__name__)


def fit_projections(plan, cfg: BankConfig) -> tuple[dict[str, Projection], dict[str, float]]:
    """Fit every level ``cfg.projection`` / ``cfg.projection_energy`` projects on ``cfg.projection_images``
    images of ``plan``; returns the bases and the fit's timing / sample counts (``seconds``, ``images``,
    ``views``)."""
    start = time.perf_counter()
    fixed, energy = projected_levels(cfg), energy_levels(cfg)
    wanted = sorted([*fixed, *energy])
    spec: BankSpec = plan.spec
    records = [plan.records[i] for i in sample_indices(spec.num_images, cfg.projection_images)]
    enc = plan.settings.encode
    settings = dataclasses.replace(plan.settings, encode=dataclasses.replace(enc, draws=1, store="draws"))
    flips = settings.flips
    accumulators = {name: CovarianceAccumulator() for name in wanted}
    per_chunk = max(1, enc.batch_size // flips)
    views = 0
    for first in range(0, len(records), per_chunk):
        chunk = records[first : first + per_chunk]
        fit_spec = BankSpec(
            levels=[dataclasses.replace(lv, components=0, basis_sha256="") for lv in spec.levels],
            num_images=len(chunk),
            draws=1,
            flips=flips,
            shard_rows=len(chunk) * flips,
            image_size=spec.image_size,
        )
        task = ShardTask(
            shard=0,
            records=chunk,
            first_image=0,
            bank_path=plan.bank_path,
            spec=fit_spec,
            bank_cfg=cfg,
            settings=settings,
        )
        rows = encode_rows(task, ShardStats(shard=0))
        ok = rows.ok.nonzero()[0]
        views += len(ok)
        if len(ok) == 0:
            continue
        for name, acc in accumulators.items():
            feats = rows.features[name]
            acc.add(feats[torch.from_numpy(ok).to(feats.device)])
    if views == 0:
        raise BankError(
            f"bank.projection: none of the {len(records)} sample images could be decoded; check the dataset"
        )
    projections = {
        name: acc.fit(fixed.get(name, 0), energy=energy.get(name, 0.0)) for name, acc in accumulators.items()
    }
    return projections, {"seconds": time.perf_counter() - start, "images": len(records), "views": views}


def projections_for(
    plan, cfg: BankConfig, *, use_dask: bool, overwrite: bool = False
) -> tuple[BankSpec, dict[str, Projection], dict]:
    """The spec with its projections and their bases: the bank's stored ones on resume, else a fresh fit (in this
    process; with ``overwrite`` also when the stored ones are damaged). Returns (spec, bases, a record for the
    encode summary)."""
    if not projected_levels(cfg) and not energy_levels(cfg):
        return plan.spec, {}, {}
    if synthesizes(plan.settings.teacher):
        raise BankError(
            "bank.projection: this bank's rows are synthesized by a GAN teacher (no dataset images to fit a basis "
            "on); set bank.projection={} for it"
        )
    try:
        stored = stored_projections(plan.bank_path, plan.spec, cfg)
    except BankError:
        if not overwrite:
            raise
        stored = None  # the bank is replaced anyway
    if stored is not None:
        projections, record = stored, {"reused": True}
    else:
        projections, record = fit_projections(plan, cfg)
        if use_dask:  # the workers load their own teachers: do not hold a second copy on a GPU meanwhile
            clear_caches()
    spec = with_projections(plan.spec, projections, images=cfg.projection_images, energy=energy_levels(cfg))
    record["levels"] = {
        name: {"k": p.components, "channels": p.channels, "energy": p.energy}
        for name, p in projections.items()
    }
    for name, p in projections.items():
        log.info(
            "projection %s: k=%d of %d channels, energy kept %.4f", name, p.components, p.channels, p.energy
        )
    return spec, projections, record
