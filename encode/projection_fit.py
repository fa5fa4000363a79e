"""The projection fit (``bank.projection``): PCA bases per level from a fixed sample, before the first shard.

It runs in the driver process, before any shard task is dispatched (with dask too): the bases must be in the bank
when it is created, and they are small (k x C floats per level). The sample's read-outs are computed by the shard
task's own code, on the driver's ``encode.device`` (``auto``: its GPU when it has one), so the fit sees exactly
what the rows will hold: for an image bank :func:`encode.worker.encode_rows` (decoding, preprocessing, views, noise
seeds, teacher) on evenly spaced images of the key-sorted dataset, draw 0, every stored flip view; for a
synthesized bank :func:`encode.synthesize.synthesized_batches` on evenly spaced rows. A resumed encode reuses the
bases stored in the bank (:func:`bank.projection.stored_projections`) instead of fitting again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import torch

from bank.config import BankConfig
from bank.projection import (
    FIT_RULE,
    CovarianceAccumulator,
    Projection,
    allocate_budget,
    components_for_energy,
    config_fit_record,
    eigenvalues,
    energy_kept,
    energy_levels,
    even_split,
    fit_from_covariance,
    fits_any,
    projected_levels,
    sample_indices,
    stored_projections,
    values_kept,
    with_projections,
)
from bank.spec import BankError, BankSpec
from encode.synthesize import synthesized_batches
from encode.worker import ShardStats, ShardTask, clear_caches, encode_rows, get_encoder
from teachers.registry import synthesizes

log = logging.getLogger(__name__)


def fit_projections(plan, cfg: BankConfig) -> tuple[dict[str, Projection], dict[str, float]]:
    """Fit the levels ``cfg`` projects (``bank.projection`` / ``projection_energy``: those levels; a
    ``projection_budget``: every level, k from :func:`bank.projection.allocate_budget`) on a sample of
    ``cfg.projection_images`` images (rows) of ``plan``; returns the bases (a budget's levels left at their
    channels have none) and the fit's record for the encode summary (``seconds``, ``images``, ``views``)."""
    start = time.perf_counter()
    spec: BankSpec = plan.spec
    fixed, energy = projected_levels(cfg), energy_levels(cfg)
    wanted = [lv.name for lv in spec.levels] if cfg.projection_budget else sorted([*fixed, *energy])
    # 1. the sample's features, as the rows will hold them
    accumulators, sample, views = _accumulate(plan, cfg, wanted)
    # 2. k per level (given, by energy, or by the budget over all levels), then the bases
    if not cfg.projection_budget:
        projections = {
            name: acc.fit(fixed.get(name, 0), energy=energy.get(name, 0.0))
            for name, acc in accumulators.items()
        }
        return projections, {"seconds": time.perf_counter() - start, "images": len(sample), "views": views}
    moments = {name: acc.covariance() for name, acc in accumulators.items()}
    positions = {lv.name: lv.height * lv.width for lv in spec.levels}
    ks = allocate_budget(
        {n: eigenvalues(cov) for n, (_m, cov) in moments.items()}, positions, cfg.projection_budget
    )
    projections = {
        lv.name: fit_from_covariance(*moments[lv.name], ks[lv.name])
        for lv in spec.levels
        if ks[lv.name] < lv.channels
    }
    return projections, {
        "seconds": time.perf_counter() - start,
        "images": len(sample),
        "views": views,
        "values_kept": values_kept(spec.levels, ks),
        "unprojected": sorted(set(ks) - set(projections)),
    }


def _accumulate(
    plan, cfg: BankConfig, levels: list[str]
) -> tuple[dict[str, CovarianceAccumulator], list[int], int]:
    """The fit sample's covariance per level of ``levels``, its image (row) indices and its view count."""
    accumulators = {name: CovarianceAccumulator() for name in levels}
    sample = sample_indices(plan.spec.num_images, cfg.projection_images)
    views = 0
    for feats in _sample_features(plan, cfg, sample):
        views += next(iter(feats.values())).shape[0]
        for name, acc in accumulators.items():
            acc.add(feats[name])
    if views == 0:
        raise BankError(
            f"bank.projection: none of the {len(sample)} sample images could be decoded; check the dataset"
        )
    return accumulators, sample, views


def _sample_features(plan, cfg: BankConfig, sample: list[int]) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch, the features (level -> (views, C, H, W) on the teacher's device) of the fit's sample: the stored
    flip views of draw 0 of images ``sample`` (rejected images left out), or a synthesized bank's rows ``sample``."""
    if synthesizes(plan.settings.teacher):
        synth, compute_lock = get_encoder(plan.settings)
        stats = ShardStats(shard=0)
        for _seeds, _images, feats in synthesized_batches(
            synth, compute_lock, sample, plan.settings.encode.batch_size, stats
        ):
            yield feats
        return
    spec: BankSpec = plan.spec
    records = [plan.records[i] for i in sample]
    enc = plan.settings.encode
    settings = dataclasses.replace(plan.settings, encode=dataclasses.replace(enc, draws=1, store="draws"))
    flips = settings.flips
    per_chunk = max(1, enc.batch_size // flips)
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
        ok = torch.from_numpy(rows.ok.nonzero()[0])
        if len(ok):
            yield {name: feats[ok.to(feats.device)] for name, feats in rows.features.items()}


def projections_for(
    plan, cfg: BankConfig, *, use_dask: bool, overwrite: bool = False
) -> tuple[BankSpec, dict[str, Projection], dict]:
    """The spec with its projections and their bases: the bank's stored ones on resume, else a fresh fit (in this
    process; with ``overwrite`` also when the stored ones are damaged). Returns (spec, bases, a record for the
    encode summary)."""
    if not fits_any(cfg):
        return plan.spec, {}, {}
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
    spec = with_projections(plan.spec, projections, record=config_fit_record(cfg))
    record["levels"] = {
        name: {"k": p.components, "channels": p.channels, "energy": p.energy}
        for name, p in projections.items()
    }
    for name, p in projections.items():
        log.info(
            "projection %s: k=%d of %d channels, energy kept %.4f", name, p.components, p.channels, p.energy
        )
    return spec, projections, record


# ---- the spectrum report (``dreamteacher encode --spectrum``) --------------------------------------------------
SPECTRUM_BUDGETS = (0.25, 0.4, 0.5)
SPECTRUM_ENERGIES = (0.95, 0.99)


def spectrum_report(plan, cfg: BankConfig) -> dict:
    """What each PCA rule would keep and cost for this encode, from the fit's own sample (every level, whatever
    ``cfg`` projects), without writing a bank: per level C, positions and the k that 95 / 99 % of the variance
    needs; per rule (no projection, C/2 everywhere, ``projection_energy`` 0.95 / 0.99 everywhere,
    ``projection_budget`` 0.25 / 0.4 / 0.5) the k and energy per level, the share of the values kept and the bytes
    per image at this bank's rows per image, codecs and pixels (before any lossless compressor). The k and energy
    are what an encode with that rule records (the same sample, :func:`allocate_budget`, the same fit)."""
    from bank.layout import array_defs

    start = time.perf_counter()
    spec: BankSpec = plan.spec
    accumulators, sample, views = _accumulate(plan, cfg, [lv.name for lv in spec.levels])
    evals = {name: eigenvalues(acc.covariance()[1]) for name, acc in accumulators.items()}
    positions = {lv.name: lv.height * lv.width for lv in spec.levels}
    channels = {lv.name: lv.channels for lv in spec.levels}

    def image_bytes(ks: dict[str, int]) -> int:
        levels = [
            dataclasses.replace(
                lv,
                components=ks[lv.name] if ks[lv.name] < lv.channels else 0,
                basis_sha256="x" if ks[lv.name] < lv.channels else "",
            )  # fmt: skip
            for lv in spec.levels
        ]
        fit = {"rule": FIT_RULE} if any(lv.components for lv in levels) else {}
        defs = array_defs(dataclasses.replace(spec, levels=levels, projection_fit=fit))
        return sum(d.row_nbytes * (1 if d.per_image else spec.views_per_image) for d in defs)

    rules: dict[str, dict[str, int]] = {
        "none": dict(channels),
        "k = C/2": even_split(channels, 0.5),
    }
    for target in SPECTRUM_ENERGIES:
        rules[f"projection_energy={target}"] = {
            n: min(components_for_energy(evals[n], target), channels[n]) for n in channels
        }
    for budget in SPECTRUM_BUDGETS:
        try:
            rules[f"projection_budget={budget}"] = allocate_budget(evals, positions, budget)
        except BankError:
            continue  # below one component per level for this teacher
    return {
        "images": len(sample),
        "views": views,
        "seconds": time.perf_counter() - start,
        "rows_per_image": spec.views_per_image,
        "levels": {
            n: {
                "channels": channels[n],
                "positions": positions[n],
                "k95": rules["projection_energy=0.95"][n],
                "k99": rules["projection_energy=0.99"][n],
            }
            for n in channels
        },  # fmt: skip
        "rules": {
            rule: {
                "k": ks,
                "energy": {n: energy_kept(evals[n], k) for n, k in ks.items()},
                "values_kept": values_kept(spec.levels, ks),
                "bytes_per_image": image_bytes(ks),
            }
            for rule, ks in rules.items()
        },
    }


def format_spectrum(report: dict) -> str:
    """The report as text: the levels, then one line per rule."""
    levels = report["levels"]
    lines = [
        f"projection spectrum: {report['images']} sample images, {report['views']} views "
        f"({report['seconds']:.1f} s); {report['rows_per_image']} rows per image",
        "level   C      positions  k for 95%  k for 99%",
    ]
    for name, lv in levels.items():
        lines.append(f"{name:<7} {lv['channels']:<6} {lv['positions']:<10} {lv['k95']:<10} {lv['k99']}")
    names = " / ".join(levels)
    lines.append(
        f"{'rule':<26} {'k per level (' + names + ')':<34} {'energy kept per level':<34} values  per image"
    )
    for rule, r in report["rules"].items():
        ks = " / ".join(str(r["k"][n]) for n in levels)
        energy = " / ".join(f"{r['energy'][n]:.3f}" for n in levels)
        nbytes = r["bytes_per_image"]
        size = f"{nbytes / 1e6:.3f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"
        lines.append(f"{rule:<26} {ks:<34} {energy:<34} {r['values_kept']:.3f}   {size}")
    lines.append("per image: this bank's rows per image, codecs and pixels, before any lossless compressor.")
    return "\n".join(lines)
