"""``run_encode``: images -> teacher features -> a resumable feature bank.

The driver does the cheap, global work (list images, dry-run the teacher to learn the taps, create or reopen the
bank; names and derived values arrive resolved in :class:`encode.inputs.EncodeInputs`) and hands one task per pending shard to :mod:`encode.distributed`; the per-shard work lives
in :mod:`encode.worker`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bank import BankSpec, BankWriter, spec_from_config
from bank.layout import SUMMARY_FILE, side_dir
from configlib import save_resolved
from encode.distributed import run_tasks
from encode.inputs import EncodeInputs
from encode.projection_fit import format_spectrum, projections_for, spectrum_report
from encode.worker import EncodeSettings, ShardTask, build_encoder, get_encoder
from sources.images import ImageRecord, keys_sha256, list_images
from teachers.provenance import DatasetRecord, Provenance
from teachers.registry import synthesizes


@dataclass
class EncodeSummary:
    """What one ``run_encode`` call did."""

    bank_path: str
    fingerprint: str
    shards_total: int
    shards_encoded: int
    """Shards encoded by this call (the others were already done)."""
    images: int
    """Images encoded by this call."""
    rows: int
    """Rows written by this call."""
    rejects: dict[str, str] = field(default_factory=dict)
    """Every unreadable image in the bank (key -> reason), including earlier runs'."""
    bytes_written: int = 0
    wall_seconds: float = 0.0
    teacher_seconds: float = 0.0
    """Summed time inside the teacher forward."""
    projection: dict[str, Any] = field(default_factory=dict)
    """Projected levels (``bank.projection``): per level k, channels and the energy kept; whether the bases were
    fitted now (seconds, sample images and views) or reused from the bank."""

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / self.wall_seconds if self.wall_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "images_per_s": self.images_per_s, "mb_per_s": self.mb_per_s}

    def format(self) -> str:
        lines = [
            f"bank           {self.bank_path}",
            f"shards         {self.shards_encoded} encoded now, {self.shards_total} in the bank",
            f"rows           {self.rows} written ({self.images} images)",
            f"rejects        {len(self.rejects)}",
            f"bytes          {self.bytes_written / 1e6:.1f} MB",
            f"wall time      {self.wall_seconds:.1f} s",
            f"throughput     {self.images_per_s:.2f} images/s, {self.mb_per_s:.1f} MB/s",
        ]
        for name, level in self.projection.get("levels", {}).items():
            how = "stored basis reused" if self.projection.get("reused") else "fitted now"
            lines.append(
                f"projection     {name}: k={level['k']} of {level['channels']} channels, energy kept "
                f"{level['energy']:.4f} ({how})"
            )
        if "values_kept" in self.projection:
            kept = ", ".join(self.projection["unprojected"]) or "none"
            lines.append(
                f"projection     budget: {self.projection['values_kept']:.4f} of the feature values kept; "
                f"levels at their channels: {kept}"
            )
        lines += [f"  reject {key}: {reason}" for key, reason in sorted(self.rejects.items())[:20]]
        return "\n".join(lines)


@dataclass
class EncodePlan:
    """The driver's view of one encode run: inputs with the measured resolution, images, settings, spec."""

    inputs: EncodeInputs
    """The resolved inputs, ``encode.resolution`` set to the teacher's measured input size."""
    records: list[ImageRecord]
    settings: EncodeSettings
    spec: BankSpec

    @property
    def bank_path(self) -> str:
        return self.inputs.encode.bank


def plan_encode(inputs: EncodeInputs, *, use_dask: bool = True) -> EncodePlan:
    """Steps 1-3: list images, dry-run the teacher (taps), build the bank spec. No bank I/O."""
    if synthesizes(inputs.teacher):  # a GAN teacher: the bank is synthesized (encode/synthesize.py)
        from encode.synthesize import plan_synthesis

        settings = EncodeSettings(encode=inputs.encode, teacher=inputs.teacher)
        readout = build_encoder(settings, torch.device("cpu")) if use_dask else get_encoder(settings)[0]
        return EncodePlan(settings=settings, **plan_synthesis(inputs, readout))
    enc, dataset = inputs.encode, inputs.dataset
    # 1. Images and their keys (deterministic order).
    records = list_images(enc.data, dataset)

    # 2. Teacher dry run: discover and validate the taps before any real work. With dask the workers load their
    #    own copies, so the driver's is built on the CPU and dropped; in-process it is the worker cache's encoder.
    settings = EncodeSettings(encode=enc, teacher=inputs.teacher)
    encoder = build_encoder(settings, torch.device("cpu")) if use_dask else get_encoder(settings)[0]
    taps_info, resolution, identity = encoder.taps_info, encoder.resolution, encoder.teacher.identity()
    del encoder

    # 3. Provenance (what the rows are a function of) and the bank spec: levels from the taps, shard size and
    #    codecs from the bank config.
    provenance = Provenance.of(
        teacher_name=enc.teacher,
        teacher=inputs.teacher,
        identity=identity,
        encoding=dataclasses.replace(settings.encoding, resolution=resolution),
        taps=taps_info,
        dataset=DatasetRecord(
            name=enc.data,
            layout=dataset.layout,
            count=len(records),
            keys_sha256=keys_sha256([r.key for r in records]),
        ),
    )
    spec = spec_from_config(
        [tap.as_dict() for tap in taps_info],
        inputs.bank,
        num_images=len(records),
        draws=settings.draws,
        flips=settings.flips,
        image_size=resolution,
        attributes=provenance.to_dict(),
        mean_of=settings.mean_of,
        mirror=settings.mirror,
    )
    measured = dataclasses.replace(inputs, encode=dataclasses.replace(enc, resolution=resolution))
    return EncodePlan(inputs=measured, records=records, settings=settings, spec=spec)


def run_spectrum(inputs: EncodeInputs) -> str:
    """``dreamteacher encode --spectrum``: plan in this process and report, from the projection fit's sample,
    what each PCA rule would keep and cost (:func:`encode.projection_fit.spectrum_report`); no bank I/O."""
    plan = plan_encode(inputs, use_dask=False)
    return format_spectrum(spectrum_report(plan, inputs.bank))


def run_encode(
    inputs: EncodeInputs,
    *,
    overwrite: bool = False,
    scheduler: str | None = None,
    use_dask: bool = True,
    progress: bool = True,
) -> EncodeSummary:
    """Encode ``inputs.encode.data`` into the bank; re-running resumes (done shards are skipped)."""
    start = time.perf_counter()
    enc = inputs.encode
    # 1-3. List, dry-run the teacher, spec.
    plan = plan_encode(inputs, use_dask=use_dask)
    spec = plan.spec

    # 3b. Projected levels (bank.projection): the bases, fitted here before any shard (or the bank's own, on resume).
    spec, projections, projection_record = projections_for(
        plan, inputs.bank, use_dask=use_dask, overwrite=overwrite
    )
    plan = dataclasses.replace(plan, spec=spec)

    # 4. Create the bank at its final size (or reopen it for resume; different settings are refused).
    writer = BankWriter.create(
        plan.bank_path, spec, inputs.bank, overwrite=overwrite, projections=projections
    )
    save_resolved(plan.inputs, side_dir(plan.bank_path), "config.yaml")
    pending = writer.pending_shards()

    # 5. One task per pending shard.
    tasks = [
        ShardTask(
            shard=i,
            records=plan.records[spec.shard_images(i).start : spec.shard_images(i).stop],
            first_image=spec.shard_images(i).start,
            bank_path=plan.bank_path,
            spec=spec,
            bank_cfg=inputs.bank,
            settings=plan.settings,
        )
        for i in pending
    ]
    stats = run_tasks(
        tasks,
        use_dask=use_dask,
        scheduler=scheduler,
        workers=enc.workers,
        tasks_per_worker=enc.tasks_per_worker,
        retries=enc.retries,
        progress=progress,
    )

    # 6. Every shard must now be done; then the run summary goes into the bank.
    # (another process or cluster may still hold claims on some: wait for it, then list what nobody wrote)
    missing = writer.wait_for_shards(writer.pending_shards())
    if missing:
        raise RuntimeError(f"shards {missing[:10]} are still not done after the run; re-run the same command")
    encoded = [s for s in stats if not s.skipped]
    summary = EncodeSummary(
        bank_path=plan.bank_path,
        fingerprint=spec.fingerprint(),
        shards_total=spec.num_shards,
        shards_encoded=len(encoded),
        images=sum(s.images for s in encoded),
        rows=sum(s.rows for s in encoded),
        bytes_written=sum(int(s.write.get("bytes", 0)) for s in encoded),
        teacher_seconds=sum(s.teacher_seconds for s in encoded),
        projection=projection_record,
    )
    summary.wall_seconds = time.perf_counter() - start
    # keys the bank's 64-byte field could not hold were shortened at listing time: keep their full paths
    long_keys = {r.key: r.full_key for r in plan.records if r.full_key != r.key}
    writer.finalize(
        {**{k: v for k, v in summary.as_dict().items() if k != "rejects"}, "long_keys": long_keys}
    )
    summary.rejects = bank_rejects(plan.bank_path)
    if progress:
        print(summary.format())
    return summary


def bank_rejects(bank_path: str) -> dict[str, str]:
    """Every reject recorded in a finalized bank (all runs), from its summary."""
    return dict(json.loads((side_dir(bank_path) / SUMMARY_FILE).read_text())["rejects"])
