"""``run_encode``: images -> teacher features -> a resumable feature bank.

The driver does the cheap, global work (resolve names, list images, dry-run the teacher to learn the taps, create
or reopen the bank) and hands one task per pending shard to :mod:`encode.distributed`; the per-shard work lives
in :mod:`encode.worker`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bank import BankSpec, BankWriter, spec_from_config
from bank.writer import SUMMARY_FILE
from configlib import ConfigError, save_resolved, to_dict
from dreamteacher.schema import PipelineConfig
from encode.distributed import run_tasks
from encode.worker import EncodeSettings, ShardTask, build_encoder, get_encoder
from sources.images import ImageRecord, keys_sha256, list_images

PREPROCESSING = (
    "guided-diffusion center_crop_arr: box-halve while the shorter side >= 2x resolution, bicubic resize of the "
    "shorter side to resolution, center crop; RGB; x0 = uint8 / 127.5 - 1"
)
SEED_RULE = (
    "eps of row (image, draw, flip) = teachers.encoding.make_noise(row_seed(seed, key, draw)); "
    "flip=1 rows use the flip=0 noise mirrored along W"
)


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
        lines += [f"  reject {key}: {reason}" for key, reason in sorted(self.rejects.items())[:20]]
        return "\n".join(lines)


@dataclass
class EncodePlan:
    """The driver's resolved view of one encode run."""

    config: PipelineConfig
    """Config with every derived value filled in (teacher, t, bank, resolution)."""
    records: list[ImageRecord]
    settings: EncodeSettings
    spec: BankSpec
    bank_path: str


def plan_encode(cfg: PipelineConfig, *, use_dask: bool = True) -> EncodePlan:
    """Steps 1-3: resolve names, list images, dry-run the teacher (taps), build the bank spec. No bank I/O."""
    enc = cfg.encode
    # 1. Names: dataset -> teacher, T, bank path.
    dataset = cfg.dataset(enc.data)
    teacher_name = enc.teacher or dataset.teacher
    if not teacher_name:
        raise ConfigError(
            f"no teacher for dataset {enc.data!r}: set encode.teacher or datasets.{enc.data}.teacher "
            f"(teachers in the config: {', '.join(sorted(cfg.teachers))})"
        )
    teacher_cfg = cfg.teacher(teacher_name)
    t = enc.t or dataset.t
    if t <= 0:
        raise ConfigError(
            f"no noise step: set encode.t or datasets.{enc.data}.t (the paper: 150 ImageNet, 50 LSUN)"
        )
    bank_path = enc.bank or f"banks/{enc.data}.zarr"

    # 2. Images and their keys (deterministic order).
    records = list_images(enc.data, dataset)
    keys_digest = keys_sha256([r.key for r in records])

    # 3. Teacher dry run: discover and validate the taps before any real work. With dask the workers load their
    #    own copies, so the driver's is built on the CPU and dropped; in-process it is the worker cache's encoder.
    flips = 2 if enc.flips == "both" else 1
    settings = EncodeSettings(
        teacher=teacher_cfg,
        mode=enc.mode,
        t=t,
        ddim_steps=enc.ddim_steps,
        resolution=enc.resolution,
        draws=enc.draws,
        flips=flips,
        seed=enc.seed,
        batch_size=enc.batch_size,
        num_workers=enc.num_workers,
        prefetch_factor=enc.prefetch_factor,
        device=enc.device,
        cpu_threads=enc.cpu_threads,
    )
    encoder = build_encoder(settings, torch.device("cpu")) if use_dask else get_encoder(settings)[0]
    taps_info, resolution = encoder.taps_info, encoder.resolution
    # Where the weights live is not content (their sha256 is): a moved checkpoint must not block a resume. The
    # paths stay in the resolved config.yaml beside the bank.
    identity = _without_locations(to_dict(encoder.teacher.identity()))
    del encoder

    # 4. Bank spec: levels from the taps, shard size and codecs from the bank config, provenance in attributes.
    teacher_config = _without_locations(to_dict(settings.teacher))
    attributes = {
        "teacher": {"name": teacher_name, "identity": identity, "config": teacher_config},
        "encoding": {
            "mode": enc.mode,
            "t": t,
            "ddim_steps": enc.ddim_steps if enc.mode == "ddim" else 0,
            "seed": enc.seed,
            "seed_rule": SEED_RULE,
        },
        "taps": [tap.as_dict() for tap in taps_info],
        "preprocessing": {"resolution": resolution, "method": PREPROCESSING},
        "dataset": {
            "name": enc.data,
            "layout": dataset.layout,
            "count": len(records),
            "keys_sha256": keys_digest,
        },
    }
    spec = spec_from_config(
        [tap.as_dict() for tap in taps_info],
        cfg.bank,
        num_images=len(records),
        draws=enc.draws,
        flips=flips,
        image_size=resolution,
        attributes=attributes,
    )
    resolved = dataclasses.replace(
        cfg, encode=dataclasses.replace(enc, teacher=teacher_name, t=t, bank=bank_path, resolution=resolution)
    )
    return EncodePlan(config=resolved, records=records, settings=settings, spec=spec, bank_path=bank_path)


_LOCATION_KEYS = frozenset({"path", "checkpoint", "_name_or_path"})


def _without_locations(data: Any) -> Any:
    """Drop file locations (recursively) from provenance that goes into the bank's fingerprint."""
    if isinstance(data, dict):
        return {k: _without_locations(v) for k, v in data.items() if k not in _LOCATION_KEYS}
    if isinstance(data, list):
        return [_without_locations(v) for v in data]
    return data


def run_encode(
    cfg: PipelineConfig,
    *,
    overwrite: bool = False,
    scheduler: str | None = None,
    use_dask: bool = True,
    progress: bool = True,
) -> EncodeSummary:
    """Encode ``cfg.encode.data`` into the bank; re-running resumes (done shards are skipped)."""
    start = time.perf_counter()
    # 1-4. Resolve, list, dry-run the teacher, spec.
    plan = plan_encode(cfg, use_dask=use_dask)
    spec = plan.spec

    # 5. Create the bank at its final size (or reopen it for resume; different settings are refused).
    writer = BankWriter.create(plan.bank_path, spec, cfg.bank, overwrite=overwrite)
    save_resolved(plan.config, plan.bank_path, "config.yaml")
    pending = writer.pending_shards()

    # 6. One task per pending shard.
    tasks = [
        ShardTask(
            shard=i,
            records=plan.records[spec.shard_images(i).start : spec.shard_images(i).stop],
            first_image=spec.shard_images(i).start,
            bank_path=plan.bank_path,
            spec=spec,
            bank_cfg=cfg.bank,
            settings=plan.settings,
        )
        for i in pending
    ]
    stats = run_tasks(
        tasks,
        use_dask=use_dask,
        scheduler=scheduler,
        workers=cfg.encode.workers,
        tasks_per_worker=cfg.encode.tasks_per_worker,
        retries=cfg.encode.retries,
        progress=progress,
    )

    # 7. Every shard must now be done; then the run summary goes into the bank.
    missing = writer.pending_shards()
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
    )
    summary.wall_seconds = time.perf_counter() - start
    writer.finalize({k: v for k, v in summary.as_dict().items() if k != "rejects"})
    summary.rejects = bank_rejects(plan.bank_path)
    if progress:
        print(summary.format())
    return summary


def bank_rejects(bank_path: str) -> dict[str, str]:
    """Every reject recorded in a finalized bank (all runs), from its summary."""
    return dict(json.loads((Path(bank_path) / SUMMARY_FILE).read_text())["rejects"])
