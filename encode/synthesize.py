"""The synthesizing encode source: a GAN teacher's bank, rows generated from seeds instead of decoded images.

Row r of the bank is (z, class) drawn from a seed derived from (``encode.seed``, r) (``teachers.synthesis``), its
pixels are the generated image as uint8 (what the student sees) and its targets are the generator's features at
the taps. Everything else is the image path's machinery, unchanged: the same bank spec and writer (one whole
``write_shard`` per shard, done marker last), the same per-process reader cache, the same dask / in-process task
runner. So a synthesized encode is deterministic, sharded, resumable and kill-safe exactly like an image encode,
and the bank writer never learns which family made the rows.

This module imports neither ``encode.pipeline`` nor ``encode.worker`` (they call it, through one hook each): the
worker's caches and stats type are handed in.

``encode.draws`` and ``encode.flips`` do not apply (one row per generated image: a mirrored image's generator
features are not the mirrored features); ``encode.mode`` / ``t`` are recorded as ``synthesize`` / 0.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from bank import ShardRows, spec_from_config
from encode.inputs import EncodeInputs
from sources.images import ImageRecord, keys_sha256
from teachers.provenance import DatasetRecord, Encoding, Provenance, SynthesisRecord
from teachers.synthesis import SYNTH_PREPROCESSING, SYNTH_SEED_RULE, GANSynthesizer, synth_key

SOURCE_LAYOUT = "synthesized"


def plan_synthesis(inputs: EncodeInputs, readout: Any) -> dict[str, Any]:
    """The synthesized bank's plan (``encode.pipeline.EncodePlan`` fields but ``settings``): ``num_images`` rows
    keyed ``synth/<row>``, taps from ``readout`` (the teacher's :class:`GANSynthesizer`, dry-run)."""
    enc, teacher_cfg = inputs.encode, inputs.teacher
    if not isinstance(readout, GANSynthesizer):
        raise TypeError(f"teachers.{enc.teacher} does not synthesize; encode its dataset's images instead")
    res = readout.resolution
    if enc.resolution not in (0, res):
        raise ValueError(
            f"encode.resolution={enc.resolution}, but teachers.{enc.teacher} generates {res} px images; the bank "
            "stores them as generated: leave encode.resolution at 0"
        )
    n = teacher_cfg.num_images
    records = [ImageRecord(key=synth_key(r), path="") for r in range(n)]
    provenance = Provenance.of(
        teacher_name=enc.teacher,
        teacher=teacher_cfg,
        identity=readout.teacher.identity(),
        encoding=Encoding(mode="synthesize", t=0, ddim_steps=0, seed=enc.seed, resolution=res),
        taps=readout.taps_info,
        dataset=DatasetRecord(
            name=f"synthesized:{enc.teacher}",
            layout=SOURCE_LAYOUT,
            count=n,
            keys_sha256=keys_sha256([r.key for r in records]),
        ),
    )
    provenance = dataclasses.replace(
        provenance,
        preprocessing=SYNTH_PREPROCESSING,
        seed_rule=SYNTH_SEED_RULE,
        synthesis=SynthesisRecord(
            num_images=n, truncation=readout.teacher.truncation, classes=list(teacher_cfg.classes)
        ),
    )
    spec = spec_from_config(
        [tap.as_dict() for tap in readout.taps_info],
        inputs.bank,
        num_images=n,
        draws=1,
        flips=1,
        image_size=res,
        attributes=provenance.to_dict(),
    )
    measured = dataclasses.replace(inputs, encode=dataclasses.replace(enc, resolution=res))
    return {"inputs": measured, "records": records, "spec": spec}


def synthesize_shard(
    task: Any,
    *,
    get_writer: Callable[..., Any],
    get_readout: Callable[[Any], tuple[Any, threading.Lock]],
    stats: Any,
) -> Any:
    """Generate every row of ``task.shard`` (an ``encode.worker.ShardTask``) and write the shard whole (the writer
    marks it done last). ``get_writer`` / ``get_readout`` are the worker's per-process caches; ``stats`` its
    ``ShardStats`` for this shard, filled in and returned."""
    start = time.perf_counter()
    writer = get_writer(task.bank_path, task.spec, task.bank_cfg)
    # claimed first, as image shards are: a done shard, or one another live process is writing, is not redone
    claim = writer.claim(task.shard)
    if claim is None:
        stats.skipped = True
        return stats
    with claim:
        _synthesize_claimed(task, writer, claim, get_readout, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def synthesized_batches(
    synth: GANSynthesizer, compute_lock: threading.Lock, rows: list[int], batch_size: int, stats: Any
) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
    """(seeds, uint8 images, tap features) of bank ``rows``, ``batch_size`` at a time: the rows a shard writes and
    the sample a projection fit sees (``encode.projection_fit``) are one computation. ``stats.teacher_seconds``
    accumulates the generator's time."""
    step = max(1, batch_size)
    for lo in range(0, len(rows), step):
        drawn = synth.draw(rows[lo : lo + step])
        with compute_lock:
            t0 = time.perf_counter()
            image_u8_BCHW, feats = synth.synthesize(drawn.z_BZ, drawn.labels_B)
            stats.teacher_seconds += time.perf_counter() - t0
        yield np.asarray(drawn.seed_B), image_u8_BCHW, feats


def _synthesize_claimed(
    task: Any, writer: Any, claim: Any, get_readout: Callable[[Any], tuple[Any, threading.Lock]], stats: Any
) -> None:
    synth, compute_lock = get_readout(task.settings)
    if not isinstance(synth, GANSynthesizer):
        raise TypeError(f"shard {task.shard}: the teacher does not synthesize")
    n_rows, res, device = len(task.spec.shard_range(task.shard)), synth.resolution, synth.device
    if n_rows != len(task.records):
        raise ValueError(f"shard {task.shard}: {len(task.records)} rows planned, the bank has {n_rows}")
    rows = np.arange(task.first_image, task.first_image + n_rows, dtype=np.int64)
    images_u8 = np.zeros((n_rows, 3, res, res), np.uint8)
    features = {
        tap.name: torch.zeros(n_rows, tap.channels, tap.height, tap.width, device=device)
        for tap in synth.taps_info
    }
    seeds = np.zeros(n_rows, np.int64)
    lo = 0
    for seed_B, image_u8_BCHW, feats in synthesized_batches(
        synth, compute_lock, rows.tolist(), task.settings.encode.batch_size, stats
    ):
        hi = lo + len(seed_B)
        images_u8[lo:hi] = image_u8_BCHW.numpy()
        for name, feats_BChw in feats.items():
            features[name][lo:hi] = feats_BChw
        seeds[lo:hi] = seed_B
        lo = hi
    shard_rows = ShardRows(
        images_u8=images_u8,
        features=features,
        keys=[r.key for r in task.records],
        source_index=rows,
        draw=np.zeros(n_rows, np.int64),
        flip=np.zeros(n_rows, np.int64),
        seed=seeds,
        ok=np.ones(n_rows, bool),
    )
    stats.write = dict(writer.write_shard(task.shard, shard_rows, claim=claim))
    stats.rows = n_rows
