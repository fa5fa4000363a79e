"""The per-shard encode task: images of one bank shard -> teacher features -> one whole ``write_shard``.

The same function runs inside a dask worker process and in-process (``--no-dask``). Each process loads the
teacher once (:func:`get_encoder` caches it) and may run several shard tasks at once on threads: a process-wide
compute lock lets one task use the teacher while another decodes its images and quantises / writes its finished
shard, so the accelerator does not wait for I/O. A task is idempotent: a shard already marked done is skipped,
and a shard is always rewritten whole, so dask retries and re-runs after ``kill -9`` are safe.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bank import BankSpec, BankWriter, ShardRows
from bank.config import BankConfig
from bank.writer import Claim
from configlib import to_dict
from encode.config import EncodeConfig
from sources.images import DecodePool, ImageRecord, to_model_range
from teachers.config import TeacherConfig
from teachers.encoding import TeacherEncoder, make_noise, row_seed
from teachers.provenance import Encoding
from teachers.provenance import build_readout as build_teacher_encoder  # a GANSynthesizer for gan kinds
from teachers.registry import synthesizes
from training.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeSettings:
    """Everything a worker needs to rebuild the encoder and preprocess images (picklable, small)."""

    encode: EncodeConfig
    """The resolved ``encode`` section (``dreamteacher.resolve``): teacher, t and bank filled in."""
    teacher: TeacherConfig
    """Its ``taps`` (empty = the family's defaults) are resolved against the loaded teacher."""

    @property
    def draws(self) -> int:
        """Draws stored per image and flip: K, or 1 for a bank of means."""
        return 1 if self.mean_of > 1 else self.encode.draws

    @property
    def mean_of(self) -> int:
        """Draws averaged into each row (``encode.store=mean``); 1 = rows are single draws."""
        return self.encode.draws if self.encode.store == "mean" else 1

    @property
    def flips(self) -> int:
        """Flip views stored: 2 (image and mirror) or 1 (image only; ``mirror`` reads the flipped one)."""
        return 2 if self.encode.flips == "both" else 1

    @property
    def mirror(self) -> bool:
        return self.encode.flips == "mirror"

    @property
    def views_per_image(self) -> int:
        """Bank rows per image."""
        return self.draws * self.flips

    @property
    def passes_per_image(self) -> int:
        """Teacher views per image: every draw of every stored flip view (K x flips, also for a bank of means)."""
        return self.encode.draws * self.flips

    @property
    def encoding(self) -> Encoding:
        enc = self.encode
        return Encoding(
            mode=enc.mode, t=enc.t, ddim_steps=enc.ddim_steps, seed=enc.seed, resolution=enc.resolution
        )

    def encoder_key(self) -> str:
        """Identifies one loaded encoder: the fields that change the teacher or its read-out."""
        key = {
            "teacher": to_dict(self.teacher),
            "encoding": to_dict(self.encoding),
            "device": self.encode.device,
            "cpu_threads": self.encode.cpu_threads,
        }
        return json.dumps(key, sort_keys=True)


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: encode and write bank shard ``shard``."""

    shard: int
    records: list[ImageRecord]
    """The shard's images, in bank order."""
    first_image: int
    """Bank image index of ``records[0]``."""
    bank_path: str
    spec: BankSpec
    bank_cfg: BankConfig
    settings: EncodeSettings


@dataclass
class ShardStats:
    """What a task reports back to the driver."""

    shard: int
    images: int = 0
    rows: int = 0
    rejects: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    """The shard was already done (a retry or a concurrent duplicate)."""
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    """Time holding the teacher (on CUDA: until its kernels are queued, not finished)."""
    write: dict[str, Any] = field(default_factory=dict)
    """``BankWriter.write_shard``'s stats (bytes, ...)."""
    worker: str = ""
    """``host:pid`` of the process that ran the task (``encode.distributed`` fills it in): which worker did what."""


# ------------------------------------------------------------------------------------------------------------
# Per-process caches
# ------------------------------------------------------------------------------------------------------------
_CACHE_LOCK = threading.Lock()
_ENCODERS: dict[str, tuple[TeacherEncoder, threading.Lock]] = {}
_WRITERS: dict[tuple[str, str], BankWriter] = {}
_DECODERS: dict[tuple[int, int], DecodePool] = {}


def build_encoder(settings: EncodeSettings, device: torch.device) -> TeacherEncoder:
    """Load the frozen teacher on ``device``, resolve its taps and dry-run them (validates taps and strides)."""
    if device.type == "cpu" and settings.encode.cpu_threads > 0:
        torch.set_num_threads(settings.encode.cpu_threads)
    return build_teacher_encoder(settings.teacher, settings.encoding, device, name=settings.encode.teacher)


def get_encoder(settings: EncodeSettings) -> tuple[TeacherEncoder, threading.Lock]:
    """The process's encoder for these settings (built on first use) and the lock that serialises its use."""
    key = settings.encoder_key()
    with _CACHE_LOCK:
        if key not in _ENCODERS:
            encoder = build_encoder(settings, resolve_device(settings.encode.device, "encode.device"))
            _ENCODERS.clear()  # one teacher per process: free the previous one before holding another
            _ENCODERS[key] = (encoder, threading.Lock())
        return _ENCODERS[key]


def get_writer(path: str, spec: BankSpec, bank_cfg: BankConfig) -> BankWriter:
    """The process's writer for this bank (opened for resume: the driver already created it)."""
    key = (path, spec.fingerprint())
    with _CACHE_LOCK:
        if key not in _WRITERS:
            _WRITERS[key] = BankWriter.create(path, spec, bank_cfg, overwrite=False)
        return _WRITERS[key]


def get_decoder(num_workers: int, prefetch_factor: int) -> DecodePool:
    """The process's decoding workers (started on first use, shared by its task threads, kept across shards)."""
    key = (num_workers, prefetch_factor)
    with _CACHE_LOCK:
        if key not in _DECODERS or _DECODERS[key].broken:
            _DECODERS[key] = DecodePool(num_workers, prefetch_factor)
        return _DECODERS[key]


def clear_writers() -> None:
    """Drop the cached bank writers only (a benchmark deleting and re-encoding a bank keeps its loaded teacher)."""
    with _CACHE_LOCK:
        _WRITERS.clear()


def clear_caches() -> None:
    """Drop cached encoders, writers and decoding workers (tests; a process switching banks)."""
    with _CACHE_LOCK:
        _ENCODERS.clear()
        _WRITERS.clear()
        for decoder in _DECODERS.values():
            decoder.close()
        _DECODERS.clear()


# ------------------------------------------------------------------------------------------------------------
# The task
# ------------------------------------------------------------------------------------------------------------
def _loader_workers(requested: int) -> int:
    if requested > 0 and multiprocessing.current_process().daemon:
        log.warning(
            "this process is daemonic (a dask worker started with distributed.worker.daemon=True) and cannot start "
            "decoding workers; decoding in-process. Start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False."
        )
        return 0
    return requested


def encode_shard(task: ShardTask) -> ShardStats:
    """Encode every row of ``task.shard`` and write the shard whole (marked done last by the writer)."""
    if synthesizes(task.settings.teacher):  # GAN teachers generate their rows (encode/synthesize.py)
        from encode.synthesize import synthesize_shard

        stats = ShardStats(shard=task.shard, images=len(task.records))
        return synthesize_shard(task, get_writer=get_writer, get_readout=get_encoder, stats=stats)
    start = time.perf_counter()
    stats = ShardStats(shard=task.shard, images=len(task.records))
    # 1. Per-process writer. The shard is claimed first: a done shard, or one that another live process or
    #    cluster is writing, is not redone (retries, duplicates, resumed runs, two encodes into one bank).
    writer = get_writer(task.bank_path, task.spec, task.bank_cfg)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    claim = writer.claim(task.shard, owner=owner)
    if claim is None and not writer.is_done(task.shard):
        # another owner holds it: a concurrent encode, or a worker the scheduler gave up on that is still dying.
        # Wait until it finishes or its claim goes stale (process gone, or lease over), then take the shard.
        writer.wait_for_shards([task.shard])
        claim = writer.claim(task.shard, owner=owner)
    if claim is None:
        stats.skipped = True
        return stats
    with claim:
        return _encode_claimed_shard(task, writer, claim, stats, start)


def _encode_claimed_shard(
    task: ShardTask, writer: BankWriter, claim: Claim, stats: ShardStats, start: float
) -> ShardStats:
    """:func:`encode_shard`'s work once ``claim`` holds the shard: teacher pass, then the whole-shard write."""
    shard_rows = encode_rows(task, stats)
    # 4. Hand the whole shard to the bank (codecs, write, done marker last), outside the compute lock.
    stats.write = dict(writer.write_shard(task.shard, shard_rows, claim=claim))
    stats.rows = len(task.spec.shard_range(task.shard))
    stats.seconds = time.perf_counter() - start
    return stats


def encode_rows(task: ShardTask, stats: ShardStats) -> ShardRows:
    """The rows of ``task.shard`` (decoded images, teacher read-outs, features on the teacher's device), not yet
    written; rejects go into ``stats``. Also the projection fit's read-out (``encode.projection_fit``)."""
    settings, spec = task.settings, task.spec
    encoder, compute_lock = get_encoder(settings)
    device, res = encoder.device, encoder.resolution

    # 2. Shard buffers: every row starts as zeros / ok=False, so a rejected image leaves zero rows behind.
    rows = spec.shard_range(task.shard)
    n_rows, views = len(rows), settings.views_per_image
    if n_rows != len(task.records) * views:
        raise ValueError(f"shard {task.shard}: {len(task.records)} images x {views} views != {n_rows} rows")
    images_u8 = np.zeros((n_rows, 3, res, res), np.uint8)
    features = {
        tap.name: torch.zeros(n_rows, tap.channels, tap.height, tap.width, device=device)
        for tap in encoder.taps_info
    }
    local_image = np.repeat(np.arange(len(task.records)), views)
    draw = np.tile(np.repeat(np.arange(settings.draws), settings.flips), len(task.records))
    flip = np.tile(np.arange(settings.flips), len(task.records) * settings.draws)
    keys = [task.records[i].key for i in local_image]
    # a row of means records the seed of its first draw (the others: row_seed(seed, key, d), d < mean_of)
    seed = np.array(
        [row_seed(settings.encode.seed, k, int(d)) for k, d in zip(keys, draw, strict=True)], dtype=np.int64
    )
    ok = np.zeros(n_rows, bool)
    # the teacher's views of one image, (draw, flip) with flip fastest: P = K x flips (= the rows, unless the
    # K draws of a view are averaged into one row)
    passes, mean_of = settings.passes_per_image, settings.mean_of
    pass_draw = np.repeat(np.arange(settings.encode.draws), settings.flips)
    pass_flip = np.tile(np.arange(settings.flips), settings.encode.draws)

    # 3. Decode in the process's worker pool (prefetching) while this thread feeds the teacher.
    images_per_batch = max(1, settings.encode.batch_size // passes)
    decoder = get_decoder(_loader_workers(settings.encode.num_workers), settings.encode.prefetch_factor)
    for batch in decoder.batches(task.records, res, images_per_batch, pin_memory=device.type == "cuda"):
        # 3a. Rejected images: recorded, rows stay zero.
        for key, good, reason in zip(batch["key"], batch["ok"].tolist(), batch["reason"], strict=True):
            if not good:
                stats.rejects[key] = reason
        good_idx = batch["index"][batch["ok"]]  # shard-local image indices
        if len(good_idx) == 0:
            continue
        # 3b. The teacher's views of each good image, (image, draw, flip) with flip fastest: the bank rows' order
        #     (a bank of means: the K draws of a row are consecutive within its image).
        n_good = len(good_idx)
        pass_draw_V = np.tile(pass_draw, n_good)
        flip_V = torch.from_numpy(np.tile(pass_flip, n_good)).bool()
        src_u8_BCHW = batch["image_u8"][batch["ok"]]
        views_u8_VCHW = src_u8_BCHW.repeat_interleave(passes, dim=0)
        views_u8_VCHW[flip_V] = views_u8_VCHW[flip_V].flip(-1)
        row_idx_R = (good_idx[:, None] * views + torch.arange(views)[None, :]).reshape(-1)
        first_of_row = np.flatnonzero(pass_draw_V < (1 if mean_of > 1 else settings.encode.draws))
        images_u8[row_idx_R.numpy()] = views_u8_VCHW[first_of_row].numpy()
        # 3c. Noise from per-draw seeds on CPU (device-independent), mirrored for flipped views.
        eps_VCHW = None
        if settings.encode.mode == "noise":
            keys_V = [task.records[i].key for i in np.repeat(good_idx.numpy(), passes)]
            seeds_V = [
                row_seed(settings.encode.seed, k, int(d)) for k, d in zip(keys_V, pass_draw_V, strict=True)
            ]
            eps_VCHW = make_noise(seeds_V, flip_V.tolist(), encoder.noise_shape)
        # 3d. One teacher read-out, serialised with the other task threads of this process. Indexing and repeating
        #     made new (pageable) tensors: pin them, so the non_blocking copies really overlap the GPU's work.
        if device.type == "cuda":
            views_u8_VCHW = views_u8_VCHW.pin_memory()
            eps_VCHW = None if eps_VCHW is None else eps_VCHW.pin_memory()
        x0_VCHW = to_model_range(views_u8_VCHW.to(device, non_blocking=True))
        #     No synchronize: on CUDA the kernels are queued and this thread runs ahead to the next batch.
        with compute_lock:
            t0 = time.perf_counter()
            feats = encoder(x0_VCHW, None if eps_VCHW is None else eps_VCHW.to(device, non_blocking=True))
            stats.teacher_seconds += time.perf_counter() - t0
        # 3e. Scatter into the shard buffers (a bank of means: the mean over each row's K draws, a fixed-order
        #     reduction, so the bytes do not depend on the device's scheduling).
        rows_dev = row_idx_R.to(device)
        for name, feats_VChw in feats.items():
            feats_RChw = feats_VChw.float()
            if mean_of > 1:
                per_image = feats_RChw.reshape(n_good, mean_of, settings.flips, *feats_RChw.shape[1:])
                feats_RChw = per_image.mean(dim=1).reshape(n_good * settings.flips, *feats_RChw.shape[1:])
            features[name].index_copy_(0, rows_dev, feats_RChw)
        ok[row_idx_R.numpy()] = True

    return ShardRows(
        images_u8=images_u8,
        features=features,
        keys=keys,
        source_index=(local_image + task.first_image).astype(np.int64),
        draw=draw.astype(np.int64),
        flip=flip.astype(np.int64),
        seed=seed,
        ok=ok,
        rejects=dict(stats.rejects),
    )
