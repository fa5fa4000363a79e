"""``make bench-bank``: codec quality/size/speed on real teacher features, and reader throughput.

Teacher: the demo teacher (assets/demo-teacher) when present, else a clearly labelled random-init UNet2DModel.
Images: matplotlib's bundled sample photos (grace_hopper.jpg, Minduka_Present_Blue_Pack.png, logo2.png), several
crops each, both flip views, two noise draws. Everything runs in ONE process on ONE thread: figures are per core.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from PIL import Image
from timing import cpu_model

from bank import Bank, BankSpec, BankWriter, EpochSampler, ShardRows, make_codec, spec_from_config
from bank.config import BankConfig
from bank.layout import array_defs
from bank.projection import CovarianceAccumulator, Projection, config_fit_record, even_split, with_projections
from bank.spec import LevelSpec
from bank.wds import export_wds, iter_rows
from teachers.config import TeacherConfig
from teachers.encoding import TeacherEncoder, make_noise
from teachers.registry import build_teacher, resolve_taps

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEACHER = ROOT / "assets" / "demo-teacher"
SAMPLE_IMAGES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
BUDGET_LABEL = "int4 + PCA budget 0.4 (k = 0.4 C)"
"""``bank.projection_budget=0.4``'s bytes, its values split evenly (:func:`bank.projection.even_split`)."""
ADM256_LEVELS = [("s32", 32, 1024, 8), ("s16", 16, 1024, 16), ("s8", 8, 512, 32), ("s4", 4, 512, 64)]
PROJECT = "project reader (Bank.read_rows, sampler batches of 16; every chunk's crc32c checked on every read)"
PROJECT_FIRST = (
    "project reader, each chunk's crc32c checked the first time this process reads it (verify_chunks=first, "
    "training's default), after one pass"
)
PROJECT_NO_CRC = "project reader, chunk crc32c not checked (verify_chunks=never)"
CEILING = "ceiling (a): raw preadv of the same rows' chunks (page cache)"
CEILING_SLOTS = "ceiling (a'): raw preadv of the same rows' chunks into their batch slots (page cache)"
CEILING_FILES = "ceiling (b): raw read of whole shard files, all views (page cache)"
BENCH_BEGIN, BENCH_END = "<!-- bank:begin -->", "<!-- bank:end -->"


def load_teacher(path: str) -> tuple[torch.nn.Module, str]:
    if path or DEMO_TEACHER.exists():
        folder = path or str(DEMO_TEACHER)
        return build_teacher(
            TeacherConfig(kind="diffusers", path=folder), "cpu"
        ), f"diffusers teacher {folder}"
    from diffusers import DDPMScheduler, UNet2DModel

    from teachers.diffusers_unet import DiffusersTeacher

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=64,
        block_out_channels=(32, 32, 64, 64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 6,
        up_block_types=("UpBlock2D",) * 6,
        norm_num_groups=8,
    )
    teacher = DiffusersTeacher(unet, DDPMScheduler(num_train_timesteps=1000)).eval().requires_grad_(False)
    return (
        teacher,
        "RANDOM-INIT UNet2DModel (no demo teacher in assets/ yet): features are NOT a trained teacher's",
    )


def real_images(size: int, crops_per_image: int) -> np.ndarray:
    """(N, 3, size, size) uint8 crops of matplotlib's sample photos."""
    import matplotlib

    rng = np.random.default_rng(0)
    out = []
    for name in SAMPLE_IMAGES:
        image = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB")
        w, h = image.size
        for _ in range(crops_per_image):
            side = int(min(w, h) * rng.uniform(0.5, 1.0))
            x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
            crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
            out.append(np.asarray(crop).transpose(2, 0, 1))
    return np.stack(out)


def encode_features(teacher, images_u8: np.ndarray, t: int, draws: int) -> dict[str, torch.Tensor]:
    """Rows (image, draw, flip) in bank order -> {level: (rows, C, h, w) float32}."""
    encoder = TeacherEncoder(
        teacher,
        resolve_taps(teacher, TeacherConfig(kind="diffusers")),
        mode="noise",
        t=t,
        ddim_steps=1,
        resolution=teacher.resolution,
        device="cpu",
        dtype_name="fp32",
        channels_last=False,
    )
    x = torch.from_numpy(images_u8).float() / 127.5 - 1
    rows_x, seeds, flips = [], [], []
    for i in range(len(x)):
        for d in range(draws):
            for f in (0, 1):
                rows_x.append(x[i].flip(-1) if f else x[i])
                seeds.append(1000 * i + d)
                flips.append(bool(f))
    x_rows = torch.stack(rows_x)
    eps = make_noise(seeds, flips, x_rows.shape[1:])
    feats: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(x_rows), 8):
        for name, value in encoder(x_rows[start : start + 8], eps[start : start + 8]).items():
            feats.setdefault(name, []).append(value)
    return {name: torch.cat(v) for name, v in feats.items()}


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def split_fit_heldout(views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the PCA fit (even images, draw 0, both flips: the encode fit's rule) and held-out rows (odd images,
    every view). Rows are (image, draw, flip) with 2 draws and 2 flips."""
    row = torch.arange(views)
    image, draw = row // 4, (row // 2) % 2
    return row[(image % 2 == 0) & (draw == 0)], row[image % 2 == 1]


def fit_level(x: torch.Tensor, k: int) -> Projection:
    acc = CovarianceAccumulator()
    acc.add(x)
    return acc.fit(k)


def _quality(x: torch.Tensor, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    flat_x, flat_d = x.reshape(n, -1), decoded.reshape(n, -1)
    cos = F.cosine_similarity(flat_x, flat_d, dim=1)
    rel = ((flat_d - flat_x).norm(dim=1) / flat_x.norm(dim=1)).mean()
    return cos, rel


def pca_codec_rows(feats: dict[str, torch.Tensor]) -> list[str]:
    """PCA (fit on the fit rows, k = C/2 and C/4) + a codec, measured on the held-out rows only."""
    lines = []
    fit_rows, held = split_fit_heldout(next(iter(feats.values())).shape[0])
    for level, x in feats.items():
        _, c, h, w = x.shape
        fp16_bytes = 2 * c * h * w
        test = x[held]
        mb = test.numel() * 4 / 1e6
        for k, name in ((c // 2, "int8"), (c // 2, "int4"), (c // 4, "int4")):
            proj = fit_level(x[fit_rows], k)
            codec = make_codec(name)
            stored = LevelSpec(name=level, stride=1, channels=k, height=h, width=w, codec=name)
            nbytes = sum(
                np.dtype(p.dtype).itemsize * int(np.prod(p.row_shape)) for p in codec.parts(stored).values()
            )
            payload = codec.encode(proj.project(test))
            cos, rel = _quality(test, proj.unproject(codec.decode(payload)))
            enc_s = timed(lambda codec=codec, proj=proj, test=test: codec.encode(proj.project(test)))
            dec_s = timed(
                lambda codec=codec, proj=proj, payload=payload: proj.unproject(codec.decode(payload))
            )
            lines.append(
                f"| {level} | {c}x{h}x{w} | pca k={k} + {name} (held out) | {nbytes / fp16_bytes:.3f} | "
                f"{cos.mean():.5f} | {cos.min():.5f} | {rel:.4f} | {mb / enc_s:.0f} | {mb / dec_s:.0f} |"
            )
    return lines


def energy_table(feats: dict[str, torch.Tensor]) -> list[str]:
    """Per level and k: energy kept on the fit rows, variance kept on held-out rows, held-out relative error and
    cosine of the projection alone (no quantisation)."""
    fit_rows, held = split_fit_heldout(next(iter(feats.values())).shape[0])
    lines = [
        "| level | C | k | k/C | energy kept (fit sample) | variance kept (held out) | held-out rel. error | "
        "held-out mean cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level, x in feats.items():
        c = x.shape[1]
        test = x[held]
        centred_total = None
        for k in sorted({max(1, c // 16), c // 8, c // 4, c // 2, (3 * c) // 4}):
            proj = fit_level(x[fit_rows], k)
            recon = proj.unproject(proj.project(test))
            if centred_total is None:
                centred_total = float(((test - proj.mean_C[None, :, None, None]) ** 2).sum())
            kept = 1 - float(((test - recon) ** 2).sum()) / centred_total
            cos, rel = _quality(test, recon)
            lines.append(
                f"| {level} | {c} | {k} | {k / c:.3f} | {proj.energy:.4f} | {kept:.4f} | {rel:.4f} | {cos.mean():.5f} |"
            )
    return lines


def codec_table(feats: dict[str, torch.Tensor]) -> list[str]:
    variants = [("fp16", "none"), ("int8", "none"), ("fp8", "none"), ("int4", "none"), ("int8", "blosc-lz4"),
                ("bitround", "blosc-lz4")]  # fmt: skip
    lines = [
        "| level | C x h x w | codec | bytes/view vs fp16 | mean cosine | min cosine | rel. error | "
        "encode MB/s | decode MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    for level, x in feats.items():
        n, c, h, w = x.shape
        fp16_bytes = 2 * c * h * w
        mb = x.numel() * 4 / 1e6  # MB of float32 features
        for name, compressor in variants:
            codec = make_codec(name)
            payload = codec.encode(x)
            decoded = codec.decode(payload)
            flat_x, flat_d = x.reshape(n, -1), decoded.reshape(n, -1)
            cos = F.cosine_similarity(flat_x, flat_d, dim=1)
            rel = ((flat_d - flat_x).norm(dim=1) / flat_x.norm(dim=1)).mean()
            nbytes = 0
            for part in payload.values():
                arr = part.numpy()
                for row in arr:  # chunk = one row, compressed per row as in the bank
                    nbytes += (
                        len(blosc.encode(np.ascontiguousarray(row))) if compressor != "none" else row.nbytes
                    )
            enc_s = timed(lambda codec=codec, x=x: codec.encode(x))
            dec_s = timed(lambda codec=codec, payload=payload: codec.decode(payload))
            label = name if compressor == "none" else f"{name}+{compressor}"
            lines.append(
                f"| {level} | {c}x{h}x{w} | {label} | {nbytes / n / fp16_bytes:.3f} | {cos.mean():.5f} | "
                f"{cos.min():.5f} | {rel:.4f} | {mb / enc_s:.0f} | {mb / dec_s:.0f} |"
            )
    return lines + pca_codec_rows(feats)


def synth_adm_rows(feats: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """ADM-256-shaped levels synthesised from the real features: real maps resized to each ADM size, channels
    tiled to the ADM count with a per-channel gain (10^U(-1,1)) so channel scales differ as in ADM."""
    g = torch.Generator().manual_seed(0)
    source = feats[sorted(feats, key=lambda k: -feats[k].shape[-1])[0]]  # the finest real level
    out = {}
    for name, _stride, c, size in ADM256_LEVELS:
        idx = torch.arange(rows) % source.shape[0]
        base = F.interpolate(source[idx], size=(size, size), mode="bilinear", align_corners=False)
        tiled = base[:, torch.arange(c) % base.shape[1]]
        out[name] = tiled * (10 ** (torch.rand(c, generator=g) * 2 - 1))[None, :, None, None]
    return out


def bench_spec(cfg: BankConfig, levels: dict[str, torch.Tensor], image_size: int) -> BankSpec:
    """A bank spec for ``levels`` (name -> (views, C, h, w) features), 2 flips per image, ``image_size`` pixels."""
    views = next(iter(levels.values())).shape[0]
    spec_levels = [
        dict(
            name=name,
            stride=image_size // f.shape[-1],
            channels=f.shape[1],
            height=f.shape[2],
            width=f.shape[3],
        )
        for name, f in levels.items()
    ]
    return spec_from_config(
        spec_levels,
        cfg,
        num_images=views // 2,
        draws=1,
        flips=2,
        image_size=image_size,
        attributes={"benchmark": "features from a real teacher (ADM-256 shapes synthesised from them)"},
    )


def bench_shards(
    spec: BankSpec, feats: dict[str, torch.Tensor], images: np.ndarray
) -> list[tuple[int, ShardRows]]:
    """Every shard's rows of a :func:`bench_spec` bank."""
    shards = []
    for shard in range(spec.num_shards):
        span = spec.shard_range(shard)
        r = np.arange(span.start, span.stop)
        rows = ShardRows(
            images_u8=images[span.start : span.stop],
            features={k: v[span.start : span.stop] for k, v in feats.items()},
            keys=[f"img{i}" for i in r // 2],
            source_index=r // 2,
            draw=np.zeros(len(r), np.int64),
            flip=r % 2,
            seed=r,
            ok=np.ones(len(r), bool),
        )
        shards.append((shard, rows))
    return shards


def _write_shards(writer: BankWriter, shards: list[tuple[int, ShardRows]]) -> None:
    for shard, rows in shards:
        writer.write_shard(shard, rows)


def _write_through_zarr(path: Path, writer: BankWriter, shards: list[tuple[int, ShardRows]]) -> None:
    """The encoded pixels and codec parts of every shard assigned to zarr-python array handles."""
    group = zarr.open_group(path, mode="r+")
    handles: dict[str, Any] = {}
    for shard, rows in shards:
        span = writer.spec.shard_range(shard)
        arrays = {"image": rows.images_u8}
        for level in writer.spec.levels:
            for part, values in writer.codecs[level.name].encode(rows.features[level.name]).items():
                arrays[f"features/{level.name}/{part}"] = values.numpy()
        for name, values in arrays.items():
            if name not in handles:
                handles[name] = group[name].with_config({"write_empty_chunks": True})
            handles[name][span.start : span.stop] = values


def writer_table(feats: dict[str, torch.Tensor], workdir: Path, rows: int, shard_rows: int) -> list[str]:
    """``BankWriter.write_shard`` (codecs, shard files, checksums, markers) per compressor, against writing the
    same encoded arrays through zarr-python array handles (what the writer did before it wrote the files), on
    small rows (the real features) and large ones (ADM-256 shapes)."""
    rng = np.random.default_rng(0)
    size = (
        feats[min(feats, key=lambda k: feats[k].shape[-1])].shape[-1] * 32
    )  # the coarsest level is stride 32
    row_sets = {
        f"real, {size}px": (
            feats,
            rng.integers(0, 256, (len(next(iter(feats.values()))), 3, size, size), np.uint8),
        ),
        "ADM-256 shapes": (synth_adm_rows(feats, rows), rng.integers(0, 256, (rows, 3, 256, 256), np.uint8)),
    }
    lines = [
        "| rows | KB/view | compressor | BankWriter.write_shard views/s | MB/s written | zarr-python array writes "
        "views/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for set_index, (label, (levels, images)) in enumerate(row_sets.items()):
        for compressor in ("none", "blosc-lz4", "zstd"):
            cfg = BankConfig(shard_rows=shard_rows, codec="int8", compressor=compressor)
            spec = bench_spec(cfg, levels, images.shape[-1])
            shards = bench_shards(spec, levels, images)
            name = f"{set_index}-{compressor}"
            writer = BankWriter.create(workdir / f"write-{name}.zarr", spec, cfg)
            direct = timed(functools.partial(_write_shards, writer, shards), 3)
            bank_files = (workdir / f"write-{name}.zarr").rglob("c/**/*")
            nbytes = sum(f.stat().st_size for f in bank_files if f.is_file())
            # the same encoded arrays through zarr-python (no checksums, no markers: a lower bound on that path)
            path = BankWriter.create(workdir / f"zarr-{name}.zarr", spec, cfg).path
            via_zarr = timed(functools.partial(_write_through_zarr, path, writer, shards), 3)
            view_kb = sum(d.row_nbytes for d in array_defs(spec) if d.sharded) / 1e3
            lines.append(
                f"| {label} | {view_kb:,.0f} | {compressor} | {spec.num_rows / direct:,.0f} "
                f"| {nbytes / 1e6 / direct:,.0f} | {spec.num_rows / via_zarr:,.0f} | {via_zarr / direct:.1f}x |"
            )
    return lines


def same_rows_ceiling(
    path: Path, spec: BankSpec, batches: list[list[int]], repeat: int, *, slots: bool = False
) -> float:
    """Best seconds to read exactly the sampler's rows' chunks with one ``preadv`` each, descriptors and shard
    indexes opened beforehand (page cache). ``slots=False``: every chunk of an array into ONE reused row buffer
    (ceiling (a): a cache-resident destination); ``slots=True``: each chunk into its own slot of a batch-sized
    buffer reused across batches, as a batch must land (ceiling (a'): the reader's own destination pattern)."""
    sharded = [d for d in array_defs(spec) if d.sharded]
    fds = {
        (d.path, s): os.open(d.shard_file(path, s), os.O_RDONLY)
        for d in sharded
        for s in range(spec.num_shards)
    }
    chunk_offsets = {}
    for key, fd in fds.items():
        index_at = os.fstat(fd).st_size - 16 * spec.shard_rows - 4  # index at the end, then its crc32c
        chunk_offsets[key] = np.frombuffer(os.pread(fd, 16 * spec.shard_rows, index_at), "<u8")[0::2].tolist()
    width = max(len(b) for b in batches) if slots else 1
    batch_buffers = {d.path: memoryview(bytearray(width * d.row_nbytes)) for d in sharded}
    plan = [
        (
            fds[(d.path, r // spec.shard_rows)],
            batch_buffers[d.path][
                (j if slots else 0) * d.row_nbytes : ((j if slots else 0) + 1) * d.row_nbytes
            ],
            chunk_offsets[(d.path, r // spec.shard_rows)],
        )
        for batch in batches
        for j, r in enumerate(batch)
        for d in sharded
    ]
    local = [r % spec.shard_rows for batch in batches for r in batch for _ in sharded]

    def ceiling_rows():
        for (fd, buffer, offsets), row in zip(plan, local, strict=True):
            os.preadv(fd, [buffer], offsets[row])

    best = timed(ceiling_rows, repeat)
    for fd in fds.values():
        os.close(fd)
    return best


def _read_all(bank: Bank, batches: list[list[int]]) -> None:
    """Every batch, each dropped before the next (as a training loop does: the pool's buffers get reused)."""
    for batch in batches:
        bank.read_rows(batch)


def two_epochs(path: Path, batch: int) -> list[list[int]]:
    """The sampler's batches (block-shuffled, one flip view per image) of two epochs of the bank at ``path``."""
    sampler = EpochSampler(Bank.open(path), batch, seed=0, flip="random")
    batches = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches.extend(sampler)
    return batches


CHECKS = ("always", "first", "never")


def best_reads(
    path: Path, spec: BankSpec, batches: list[list[int]], *, ceiling: bool, rounds: int = 5
) -> dict[str, float]:
    """Best seconds to read ``batches`` with each chunk-check policy (``first`` after its one checking pass) and,
    with ``ceiling``, ceiling (a'); they alternate, ``rounds`` rounds, so that machine drift hits all alike."""
    readers = {check: Bank.open(path, verify_chunks=check) for check in CHECKS}
    _read_all(readers["first"], batches)  # its one pass that checks every chunk
    best = dict.fromkeys([*readers, *(["ceiling"] if ceiling else [])], float("inf"))
    for _ in range(rounds):
        for check, reader in readers.items():
            best[check] = min(best[check], timed(functools.partial(_read_all, reader, batches), 1))
        if ceiling:
            best["ceiling"] = min(best["ceiling"], same_rows_ceiling(path, spec, batches, 1, slots=True))
    return best


READER_CODEC_HEAD = [
    "| codec | MB/view | project reader views/s (crc32c on every read) | checked once per process, after one "
    "pass (training) | unchecked | ceiling (a') views/s | every read / (a') | once / (a') | unchecked / (a') |",
    "|---|---|---|---|---|---|---|---|---|",
]


def reader_codec_table(
    feats: dict[str, torch.Tensor], workdir: Path, rows: int, shard_rows: int, batch: int
) -> list[str]:
    """The project reader (chunk crc32c checked on every read, once per process, never) against the same-rows
    ceiling into batch slots (a'), per codec, on ADM-256-shaped banks of ``rows`` rows in ``shard_rows``-row
    shards read in sampler batches of ``batch``; they alternate (5 rounds, best of each) so that machine drift
    hits all alike."""
    adm = synth_adm_rows(feats, rows)
    images = np.random.default_rng(0).integers(0, 256, (rows, 3, 256, 256), dtype=np.uint8)
    budget = even_split({name: c for name, _stride, c, _size in ADM256_LEVELS}, 0.4)  # projection_budget=0.4
    variants = [("fp16", "fp16", {}), ("int8", "int8", {}), ("fp8", "fp8", {}), ("int4", "int4", {}),
                ("int4 + PCA s4 k=128", "int4", {"s4": 128}), (BUDGET_LABEL, "int4", budget)]  # fmt: skip
    lines = []
    for label, codec, pca in variants:
        cfg = BankConfig(shard_rows=shard_rows, codec=codec, projection=pca)
        spec = bench_spec(cfg, adm, 256)
        projections = {}
        for name, k in pca.items():  # any orthonormal basis: the reader's speed does not depend on it
            c = spec.level(name).channels
            basis = torch.linalg.qr(torch.randn(c, k, generator=torch.Generator().manual_seed(0)))[
                0
            ].T.contiguous()
            projections[name] = Projection(torch.zeros(c), basis)
        spec = with_projections(spec, projections, record=config_fit_record(cfg))
        path = workdir / f"reader-{codec}-{len(pca)}.zarr"
        writer = BankWriter.create(path, spec, cfg, projections=projections)
        for shard, shard_rows_ in bench_shards(spec, adm, images):
            writer.write_shard(shard, shard_rows_)
        batches = two_epochs(path, batch)
        views = sum(len(b) for b in batches)
        best = best_reads(path, spec, batches, ceiling=True)
        view_mb = sum(d.row_nbytes for d in array_defs(spec) if d.sharded) / 1e6
        rates = {name: f"{views / s:,.0f} ({views / s * view_mb / 1e3:.2f} GB/s)" for name, s in best.items()}
        ratios = {name: best["ceiling"] / best[name] for name in CHECKS}
        lines.append(
            f"| {label} | {view_mb:.2f} | {rates['always']} | {rates['first']} | {rates['never']} | "
            f"{rates['ceiling']} | {ratios['always']:.0%} | **{ratios['first']:.0%}** | {ratios['never']:.0%} |"
        )
        shutil.rmtree(path, ignore_errors=True)
    return lines


def reader_table(
    feats: dict[str, torch.Tensor], workdir: Path, rows: int, shard_rows: int
) -> tuple[list[str], str]:
    cfg = BankConfig(shard_rows=shard_rows, codec="int8")
    adm = synth_adm_rows(feats, rows)
    spec = bench_spec(cfg, adm, 256)
    path = workdir / "adm256.zarr"
    writer = BankWriter.create(path, spec, cfg)
    images = np.random.default_rng(0).integers(0, 256, (rows, 3, 256, 256), dtype=np.uint8)
    for shard, shard_rows_ in bench_shards(spec, adm, images):
        writer.write_shard(shard, shard_rows_)
    view_mb = sum(d.row_nbytes for d in array_defs(spec) if d.sharded) / 1e6
    # 1. the project's reader under each check policy: sampler batches (block-shuffled), all levels + pixels,
    #    encoded payload
    batches = two_epochs(path, 16)
    batch_views = sum(len(b) for b in batches)
    best = best_reads(path, spec, batches, ceiling=False)
    names = {"always": PROJECT, "first": PROJECT_FIRST, "never": PROJECT_NO_CRC}
    results = {names[check]: batch_views / seconds for check, seconds in best.items()}
    # 2. zarr-python, one call per row per array
    group = zarr.open_group(path, mode="r")
    arrays = [group[d.path] for d in array_defs(spec) if d.sharded]
    sample_rows = np.random.default_rng(0).permutation(spec.num_rows)[:32]
    results["zarr-python per-row reads (a[i], every array)"] = len(sample_rows) / timed(
        lambda: [a[int(i)] for i in sample_rows for a in arrays], 2
    )
    # 3. WebDataset stream of the export (decoded .npy, one process)
    tars = export_wds(path, workdir / "wds", rows_per_tar=64, progress=False)
    urls = [str(t) for t in tars]
    results["WebDataset stream (.npy entries decoded)"] = spec.num_rows / timed(
        lambda: sum(1 for _ in iter_rows(urls)), 2
    )
    # 4. ceilings, from the page cache with minimal work (descriptors and shard indexes opened beforehand, one
    #    reused buffer): (a) exactly the bytes the project reader reads -- the same sampled rows (1 of draws x
    #    flips views per image), one preadv per chunk; (b) every shard file read whole and sequentially, per view
    #    (all views of every image: more bytes, fewer and larger reads)
    results[CEILING] = batch_views / same_rows_ceiling(path, spec, batches, 5)
    results[CEILING_SLOTS] = batch_views / same_rows_ceiling(path, spec, batches, 5, slots=True)
    sharded = [d for d in array_defs(spec) if d.sharded]
    files = [d.shard_file(path, s) for d in sharded for s in range(spec.num_shards)]
    buffer = bytearray(max(f.stat().st_size for f in files))

    def ceiling_files():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(buffer)

    results[CEILING_FILES] = spec.num_rows / timed(ceiling_files, 5)
    lines = [
        "| reader | views/s per core | GB/s | vs ceiling (a) | vs ceiling (a') |",
        "|---|---|---|---|---|",
    ]
    for name, vps in results.items():
        lines.append(
            f"| {name} | {vps:,.0f} | {vps * view_mb / 1e3:.2f} | {vps / results[CEILING]:.0%} "
            f"| {vps / results[CEILING_SLOTS]:.0%} |"
        )
    zarr_ratio = results[PROJECT] / results["zarr-python per-row reads (a[i], every array)"]
    note = (
        f"One view = {view_mb:.2f} MB (int8 ADM-256 levels + 256x256 uint8 pixels); {spec.num_rows} views, "
        f"{spec.shard_rows}-row shards; the sampler reads 1 of the {spec.views_per_image} views of each image. "
        f"Project reader = {zarr_ratio:.1f}x zarr-python per-row reads, "
        f"{results[PROJECT] / results[CEILING]:.0%} of the same-rows ceiling and "
        f"{results[PROJECT] / results[CEILING_FILES]:.0%} of the whole-file ceiling. Checking every chunk's "
        f"crc32c on every read costs {1 - results[PROJECT] / results[PROJECT_NO_CRC]:.1%} of the unchecked "
        f"reader's views/s; checking each chunk once per process (training's default) "
        f"{1 - results[PROJECT_FIRST] / results[PROJECT_NO_CRC]:.1%} once every chunk has been read (the readers "
        "alternate, 5 rounds). Best of 5 runs each (runs vary by up to ~2x on a busy machine)."
        "\n\nCeiling (a) reads exactly the bytes the project reader reads (the sampler's rows) with one `preadv` "
        "per chunk into ONE reused row buffer per array, descriptors and shard indexes opened beforehand: its "
        "destination stays in the CPU cache, which no reader can do, since a batch must land in distinct memory. "
        "Ceiling (a') is the same reads into each chunk's own slot of a batch-sized buffer reused across batches "
        "(the reader's own destination pattern): the fair ceiling, used per codec below. "
        "Ceiling (b) reads every shard file whole and sequentially and divides by all views (more bytes than an "
        "epoch reads, in fewer and larger reads)."
    )
    return lines, note


IMAGENET_IMAGES = 1_281_167
TODAY = ("int8", "draws", "both", "rows")
"""The default bank today (int8, K=2 draws, both flips, pixels per row): the size the issue divides by 8."""


def pixel_ratios(size: int = 256, crops: int = 8) -> dict[str, dict[str, float]]:
    """Lossless size / raw size of (3, size, size) uint8 pixels: PNG (PIL, default level) of the HWC image, and
    zstd level 3 of the stored CHW bytes (``bank.pixel_compressor=zstd``), on crops of matplotlib's natural photo
    (grace_hopper.jpg, JPEG-decoded like ImageNet's) and on the demo's synthetic scenes."""
    import io

    import matplotlib

    from sources.demo_scenes import scene_for

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = np.random.default_rng(1)
    sets: dict[str, list[np.ndarray]] = {
        "natural photo (grace_hopper.jpg crops)": [],
        "demo scenes (synthetic)": [],
    }
    w, h = photo.size
    for _ in range(crops):
        side = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        sets["natural photo (grace_hopper.jpg crops)"].append(
            np.asarray(photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC))
        )
    for i in range(crops):
        scene = Image.fromarray(scene_for("unlabeled", i).image_HW3).resize((size, size), Image.BICUBIC)
        sets["demo scenes (synthetic)"].append(np.asarray(scene))
    zstd = numcodecs.Zstd(level=3)
    out = {}
    for name, images in sets.items():
        raw = sum(im.nbytes for im in images)
        png = 0
        for im in images:
            buffer = io.BytesIO()
            Image.fromarray(im).save(buffer, format="PNG")
            png += buffer.tell()
        z = sum(len(zstd.encode(np.ascontiguousarray(im.transpose(2, 0, 1)))) for im in images)
        out[name] = {"png": png / raw, "zstd": z / raw}
    return out


def view_feature_bytes(levels: list[LevelSpec], codec: str, pca: dict[str, int]) -> int:
    """Bytes of one view's features from the codecs' own ``parts()`` (PCA levels store k channels)."""
    total = 0
    for lv in levels:
        stored = LevelSpec(**{**lv.__dict__, "codec": codec, "components": pca.get(lv.name, 0),
                              "basis_sha256": "x" if pca.get(lv.name) else ""}).stored  # fmt: skip
        total += sum(
            np.dtype(p.dtype).itemsize * int(np.prod(p.row_shape))
            for p in make_codec(codec).parts(stored).values()
        )
    return total


def size_table(zstd_ratio: float, png_ratio: float) -> tuple[list[str], list[str]]:
    """Bytes per image and the ImageNet-1k total at ADM-256 shapes for each storage setting (analytic, from the
    codecs' ``parts()``); returns the per-view codec lines and the per-setting lines."""
    from teachers.adm import adm_tap_shapes

    levels = [LevelSpec(name=t.name, stride=t.stride, channels=t.channels, height=t.height, width=t.width,
                        codec="fp16") for t in adm_tap_shapes("adm-256-uncond")]  # fmt: skip
    s4 = next(lv for lv in levels if lv.stride == 4)
    codecs = {
        "fp16": ("fp16", {}),
        "int8": ("int8", {}),
        "fp8": ("fp8", {}),
        "int4": ("int4", {}),
        f"int4+PCA s4 k={s4.channels // 2}": ("int4", {s4.name: s4.channels // 2}),
        f"int4+PCA s4 k={s4.channels // 4}": ("int4", {s4.name: s4.channels // 4}),
        # a budget's bytes do not depend on how the fit splits the values between levels, but for the codec's
        # per-(row, channel group) scales (< 0.2 % of a view): k = budget x C at every level stands for any split
        "int4+PCA budget 0.4": ("int4", even_split({lv.name: lv.channels for lv in levels}, 0.4)),
    }
    per_view = {label: view_feature_bytes(levels, codec, pca) for label, (codec, pca) in codecs.items()}
    values = sum(lv.channels * lv.height * lv.width for lv in levels)
    pixels = 3 * 256 * 256
    view_lines = [
        "| codec (bank.codec, bank.projection) | MB/view | vs fp16 | vs int8 |",
        "|---|---|---|---|",
    ]
    for label, nbytes in per_view.items():
        view_lines.append(
            f"| {label} | {nbytes / 1e6:.3f} | {nbytes / per_view['fp16']:.3f} | {nbytes / per_view['int8']:.3f} |"
        )
    # settings that give the same rows per image share a line: K=1 and the mean of K store one row per flip view,
    # mirror and none one flip view
    row_settings = {
        4: "encode.draws=2 (store=draws) x flips=both",
        2: "draws=2 x flips=mirror or none; draws=1 or store=mean x flips=both",
        1: "draws=1 or store=mean x flips=mirror or none",
    }
    pixel_modes = {
        "rows": ("per row (bank.pixels=rows)", None),
        "image": ("once per image (bank.pixels=image)", 1.0),
        "zstd": ("once per image, zstd (bank.pixel_compressor=zstd)", zstd_ratio),
        "png": (f"once per image, PNG ratio {png_ratio:.2f} (not a bank option)", png_ratio),
    }

    def per_image(label: str, rows: int, pix: str) -> float:
        ratio = pixel_modes[pix][1]
        return rows * per_view[label] + (rows * pixels if ratio is None else pixels * ratio)

    today = per_image("int8", 4, "rows")
    head = "| rows per image | settings | pixels | " + " | ".join(per_view) + " |"
    lines = [head, "|" + "---|" * (3 + len(per_view))]
    for rows, settings in row_settings.items():
        for pix, (pix_label, _ratio) in pixel_modes.items():
            cells = []
            for label in per_view:
                nbytes = per_image(label, rows, pix)
                cell = f"{nbytes / 1e6:.2f} MB, {nbytes * IMAGENET_IMAGES / 1e12:.2f} TB"
                cells.append(f"**{cell}**" if nbytes <= today / 8 * (1 + 1e-9) else cell)
            lines.append(f"| {rows} | {settings} | {pix_label} | " + " | ".join(cells) + " |")
    note = (
        f"A view is {values:,} feature values (ADM-256 taps {', '.join(f'{lv.channels}x{lv.height}x{lv.width}' for lv in levels)}); "
        f"the stride-4 level holds {s4.channels * s4.height * s4.width / values:.0%} of them. Today's default "
        f"(int8, K=2 draws, both flips, pixels per row) is {today / 1e6:.2f} MB per image, "
        f"{today * IMAGENET_IMAGES / 1e12:.1f} TB for ImageNet-1k ({IMAGENET_IMAGES:,} images); **bold** = at most "
        f"one eighth of it ({today / 8 / 1e6:.2f} MB). Pixels: 3x256x256 uint8 = {pixels / 1e6:.3f} MB raw; zstd "
        f"and PNG at the ratios measured on the natural photo below ({zstd_ratio:.3f}, {png_ratio:.3f}). "
        "`flips=mirror` stores one row per draw and reads the flipped view as its mirror; `none` has no flipped "
        "view at all. Each cell: bytes per image, and for ImageNet-1k."
    )
    return view_lines, lines + ["", note]


def write_doc(text: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    content = doc.read_text()
    block = f"{BENCH_BEGIN}\n{text}\n{BENCH_END}"
    if BENCH_BEGIN in content:
        head, rest = content.split(BENCH_BEGIN, 1)
        content = head + block + rest.split(BENCH_END, 1)[1]
    else:
        content = content.replace("<!-- bank: filled by benchmarks/bench_bank.py results -->", block)
    doc.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--teacher", default="", help="diffusers teacher folder (default: assets/demo-teacher)"
    )
    parser.add_argument("--t", type=int, default=50)
    parser.add_argument("--crops", type=int, default=4, help="crops per sample photo")
    parser.add_argument("--rows", type=int, default=96, help="rows of the ADM-256-shaped reader bank")
    parser.add_argument("--shard-rows", type=int, default=16)
    parser.add_argument("--no-doc", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher, teacher_label = load_teacher(args.teacher)
    images = real_images(teacher.resolution, args.crops)
    feats = encode_features(teacher, images, args.t, draws=2)
    machine = (
        f"{platform.machine()} {os.cpu_count()}-core CPU ({cpu_model()}), no GPU, 1-min load average {os.getloadavg()[0]:.1f} "
        "at the start; 1 thread"
    )
    views = next(iter(feats.values())).shape[0]
    ratios = pixel_ratios()
    natural = ratios["natural photo (grace_hopper.jpg crops)"]
    view_lines, size_lines = size_table(natural["zstd"], natural["png"])
    energy_lines = energy_table(feats)
    workdir = Path(tempfile.mkdtemp(prefix="bench-bank-"))
    try:
        codec_lines = codec_table(feats)
        reader_lines, reader_note = reader_table(feats, workdir, args.rows, args.shard_rows)
        writer_lines = writer_table(feats, workdir, args.rows, args.shard_rows)
        reader_codec_small = reader_codec_table(feats, workdir, args.rows, args.shard_rows, 16)
        reader_codec_default = reader_codec_table(feats, workdir, 4 * 64, 64, 64)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(
        [
            f"Machine: {machine}. Teacher: {teacher_label}, T={args.t}, {len(images)} crops of matplotlib's sample "
            f"photos x 2 draws x 2 flips = {views} views at {teacher.resolution}px.",
            "",
            "**Codecs per level** (bytes incl. int8 scale/offset; MB/s of float32 features, one thread):",
            "",
            *codec_lines,
            "",
            "PCA rows: the basis is fitted (bank.projection's rule: float64 covariance over every position, top-k "
            "eigenvectors) on the even images' draw-0 views (both flips) and measured on the odd images' views only "
            "(held out); bytes/view are the k-channel codec parts over the C-channel fp16 bytes.",
            "",
            "**PCA energy per level and k** (demo teacher; fit and held-out rows as above; projection alone, no "
            "quantisation):",
            "",
            *energy_lines,
            "",
            "**Storage at ADM-256 shapes** (analytic: bytes from the codecs' own `parts()`; "
            "`bank.projection={s4: k}` with `bank.codec=int4`):",
            "",
            *view_lines,
            "",
            *size_lines,
            "",
            "Lossless pixel ratios (compressed / raw, 8 crops of 256x256 each): "
            + "; ".join(f"{name}: PNG {r['png']:.3f}, zstd-3 {r['zstd']:.3f}" for name, r in ratios.items())
            + ". The demo scenes are synthetic flat-shaded shapes and compress far better than photos; the one "
            "natural photo at hand is a JPEG-decoded portrait (matplotlib's grace_hopper.jpg). ImageNet-like natural "
            "images at 256 px typically give ~0.5-0.6 of raw with PNG (literature range, not measured here on "
            "ImageNet).",
            "",
            "**Readers** (ADM-256 level shapes synthesised from the real features above):",
            "",
            *reader_lines,
            "",
            reader_note,
            "",
            "**Writers** (int8; the real features above and the ADM-256-shaped rows; best of 3 writes of every shard):",
            "",
            *writer_lines,
            "",
            "**Reader per codec** (ADM-256-shaped banks of each codec, same rows; the project reader with each "
            "chunk's crc32c checked on every read, once per process (after its checking pass) and never, against "
            "ceiling (a'); 5 alternating rounds, best of each). At the shipped shard size (bank.shard_rows=64) in "
            "sampler batches of 64 (a DataLoader worker's batch at distill.batch_size=256 on one GPU is 256), "
            "256 views:",
            "",
            *READER_CODEC_HEAD,
            *reader_codec_default,
            "",
            f"In {args.shard_rows}-row shards and sampler batches of 16 ({args.rows} views): the small-batch case, "
            "where the reader's per-array, per-shard Python work weighs most:",
            "",
            *READER_CODEC_HEAD,
            *reader_codec_small,
            "",
            "zarr-python array writes = the same codec encode, then pixels and codec parts assigned shard by shard "
            "to zarr array handles: the writer's path before it wrote the shard files itself, without its per-row "
            "arrays, checksums and markers. The files are the same bytes (tests/test_bank_io.py). Small rows gain the "
            "most: zarr-python's cost is per chunk (one row). For ADM-256 rows most of a write on a CPU is the int8 "
            "codec's arithmetic, which a CUDA encode runs on the GPU (a shard's features stay on the device until "
            "encoded).",
        ]
    )
    print(text)
    if not args.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
