"""``make bench-encode``: how much of the teacher's forward throughput survives the whole encode stage.

Table 1: a mid-size random-init diffusers UNet2DModel (~25M parameters). Bare teacher read-out (noise + one UNet
pass with the taps hooked, on pre-decoded batches) vs the end-to-end ``run_encode`` (listing, decoding in
decoding workers, noise, teacher, codecs, shard file writes, done markers, summary) on the same images, batches and
device. Target: end-to-end / bare >= 0.90.

Table 2: the paper's teacher, ADM-256 (preset adm-256-uncond, random weights, loaded from a guided-diffusion-format
checkpoint): parameter count, tap shapes, bare vs end-to-end throughput as in table 1, bytes per view per codec at
the paper's taps.

Run: ``.venv/bin/python benchmarks/bench_encode.py [--device cpu|cuda] [--images N] [--no-adm] [--write-docs]``.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image
from timing import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"


def make_unet_teacher(tmp: Path, resolution: int) -> str:
    """A random-init mid-size UNet2DModel + DDPM schedule; returns its ``teachers.bench`` YAML."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=resolution,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp / "teacher")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp / "teacher")
    return f"{{kind: diffusers, path: {tmp / 'teacher'}}}"


def make_adm_teacher(tmp: Path) -> str:
    """ADM-256 (adm-256-uncond) with random weights, saved as guided-diffusion saves it; returns its YAML."""
    from teachers.adm import adm_from_flags
    from teachers.adm_presets import preset_flags

    torch.manual_seed(0)
    torch.save(adm_from_flags(preset_flags("adm-256-uncond")).state_dict(), tmp / "adm.pt")
    return f"{{kind: adm, preset: adm-256-uncond, checkpoint: {tmp / 'adm.pt'}, dtype: bf16}}"


def make_images(tmp: Path, images: int, resolution: int) -> None:
    """``images`` generated photo-like JPEGs (larger than ``resolution``: the encode resizes and crops)."""
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : resolution + 16, 0 : resolution + 24]
    for i in range(images):
        # smooth gradients + noise: compresses like a photo, not like white noise
        base = np.stack([np.sin(xx / (5 + i) + c) * 100 + yy for c in range(3)], axis=-1)
        arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp / "images" / f"{i:04d}.jpg", quality=90)


def bench_end_to_end(
    device: str,
    tmp: Path,
    teacher_yaml: str,
    resolution: int,
    batch_size: int,
    num_workers: int,
    repeats: int,
    extra: tuple[str, ...] = (),
    cpu_threads: int = 0,
) -> dict:
    """Bare teacher read-out vs ``run_encode`` on the images in ``tmp/images``: ``repeats`` end-to-end runs, each
    between two bare runs."""
    from dreamteacher.resolve import resolve
    from dreamteacher.schema import load_pipeline
    from encode.pipeline import run_encode
    from encode.worker import EncodeSettings, clear_writers, get_encoder
    from sources.images import list_images, load_image, to_model_range
    from teachers.encoding import TeacherEncoder, make_noise, row_seed

    cfg = load_pipeline(
        ROOT / "pipeline.yaml",
        [
            f"datasets.bench={{root: {tmp / 'images'}, layout: folder, teacher: bench, t: 150}}",
            f"teachers.bench={teacher_yaml}",
            "encode.data=bench",
            f"encode.bank={tmp / 'bank.zarr'}",
            f"encode.batch_size={batch_size}",
            f"encode.num_workers={num_workers}",
            f"encode.device={device}",
            f"encode.cpu_threads={cpu_threads}",
            "bank.codec=int8",
            *extra,
        ],
    )
    inputs = resolve(cfg, "encode")
    enc = inputs.encode
    settings = EncodeSettings(encode=enc, teacher=inputs.teacher)
    flips, views = settings.flips, settings.views_per_image
    encoder, _ = get_encoder(settings)  # the same cached encoder run_encode's in-process tasks use
    params = sum(p.numel() for p in encoder.teacher.parameters())
    from teachers.encoding import readout_flops

    # 1. Bare read-out on pre-decoded batches with the same composition as the encode's.
    records = list_images("bench", inputs.dataset)
    per_batch = max(1, enc.batch_size // views)
    batches = []
    for start in range(0, len(records), per_batch):
        chunk = records[start : start + per_batch]
        u8 = torch.from_numpy(np.stack([load_image(r, resolution)[0] for r in chunk]))
        u8 = u8.repeat_interleave(views, dim=0)
        seeds = [row_seed(enc.seed, r.key, d) for r in chunk for d in range(enc.draws) for _ in range(flips)]
        flip_flags = [bool(f) for _ in chunk for _ in range(enc.draws) for f in range(flips)]
        batches.append((to_model_range(u8).to(encoder.device), make_noise(seeds, flip_flags, u8.shape[1:])))
    encoder(*batches[0])  # warm-up (allocator, kernels)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    # the same read-out running the whole UNet (teacher.early_stop=false), for the early stop's speed-up
    full = TeacherEncoder(
        encoder.teacher, encoder.taps, mode=encoder.mode, t=encoder.t, ddim_steps=encoder.ddim_steps,
        resolution=encoder.resolution, device=encoder.device, dtype_name=encoder.dtype_name,
        channels_last=encoder.channels_last, early_stop=False,
    )  # fmt: skip
    full(*batches[0])
    # FLOPs of one view's read-out, counted on a real pass (a teacher too big for that is counted on the meta
    # device by the caller: bench_adm)
    small = params < 100e6
    flops = (readout_flops(full), readout_flops(encoder)) if small else (0, 0)

    def bare_seconds(readout: TeacherEncoder = encoder) -> float:
        sync()
        start = time.perf_counter()
        for x0, eps in batches:
            readout(x0, eps.to(encoder.device))
        sync()
        return time.perf_counter() - start

    # 2. End to end, in-process (no cluster start-up in the figure; see docs/encode.md for dask).
    #    Bare and end-to-end runs alternate, bare first and last, and each end-to-end run is compared with the
    #    mean of the two bare runs around it: the machine is shared (identical bare runs here differ by up to
    #    20% a few seconds apart), and bracketing cancels a drift between the two. The median of these paired
    #    ratios is the figure; their range and the bare runs' own drift (the noise floor) are printed too.
    #    The bare loop runs on a pool thread like the encode's tasks: measured here, torch CPU ops ran up to
    #    2x slower on the interpreter's main thread than on a fresh thread, which would flatter the ratio.
    #    One untimed encode first, as the bare loop had its warm-up: it starts the process's decoding workers,
    #    a one-off of a few seconds per encode process that a real run pays once, not per batch.
    run_encode(inputs, use_dask=False, progress=False)
    bare, e2e, teacher = [], [], []
    with ThreadPoolExecutor(max_workers=1) as pool:
        bare.append(pool.submit(bare_seconds).result())
        for _ in range(repeats):
            shutil.rmtree(tmp / "bank.zarr", ignore_errors=True)
            clear_writers()  # a cached writer would still hold the deleted bank's done shards
            summary = run_encode(inputs, use_dask=False, progress=False)
            e2e.append(summary.wall_seconds)
            teacher.append(summary.teacher_seconds)
            bare.append(pool.submit(bare_seconds).result())
        # bare read-outs without the early stop, bracketed by early-stopped ones like the end-to-end runs
        bare_full = []
        for _ in range(max(1, min(repeats, 3))):
            bare_full.append(pool.submit(bare_seconds, full).result())
            bare.append(pool.submit(bare_seconds).result())
    around = [(before + after) / 2 for before, after in itertools.pairwise(bare)]
    around_full = around[len(e2e) :]
    around = around[: len(e2e)]
    ratios = [b / e for b, e in zip(around, e2e, strict=True)]
    drift = [after / before for before, after in itertools.pairwise(bare[: len(e2e) + 1])]
    return {
        "params_m": params / 1e6,
        "flops_full": flops[0],
        "flops_early": flops[1],
        "taps": [(t.name, t.channels, t.height, t.width) for t in encoder.taps_info],
        "images": len(records),
        "views": len(records) * views,
        "resolution": resolution,
        "batch": enc.batch_size,
        "bare_img_s": len(records) / statistics.median(bare),
        "bare_full_img_s": len(records) / statistics.median(bare_full),
        "early_stop_speedup": statistics.median([f / b for f, b in zip(bare_full, around_full, strict=True)]),
        "e2e_img_s": len(records) / statistics.median(e2e),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
        "bare_drift": (min(drift), max(drift)),
        # ratio = busy / slowdown: the share of the wall time inside the teacher, and how much slower the
        # teacher ran inside the encode than alone
        "busy": statistics.median([t / e for t, e in zip(teacher, e2e, strict=True)]),
        "teacher_vs_bare": statistics.median([t / b for t, b in zip(teacher, around, strict=True)]),
        "bank_mb": summary.bytes_written / 1e6,
        "mb_s": summary.bytes_written / 1e6 / statistics.median(e2e),
        "repeats": repeats,
        "shard_rows": cfg.bank.shard_rows,
        "load_avg": os.getloadavg()[0],
        "device": str(encoder.device),
        "threads": torch.get_num_threads(),
    }


def bench_adm(device: str, images: int, repeats: int) -> dict:
    """ADM-256 facts (parameters, taps, bytes per view per codec) and its bare vs end-to-end throughput."""
    from bank.codecs import CODECS, make_codec
    from bank.spec import LevelSpec
    from teachers.adm import adm_tap_shapes

    bytes_per_view = {}
    for name in CODECS:
        codec = make_codec(name)
        total = 0
        for tap in adm_tap_shapes("adm-256-uncond"):
            level = LevelSpec(tap.name, tap.stride, tap.channels, tap.height, tap.width, name)
            for part in codec.parts(level).values():
                total += math.prod(part.row_shape) * np.dtype(part.dtype).itemsize
        bytes_per_view[name] = total
    on_gpu = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench-encode-adm-") as tmp_name:
        tmp = Path(tmp_name)
        make_images(tmp, images, 256)
        # one view per image on CPU (a read-out is ~30 s there); the default 2 draws x 2 flips on a GPU
        views = ("encode.draws=1", "encode.flips=none", f"bank.shard_rows={images}") if not on_gpu else ()
        result = bench_end_to_end(
            device, tmp, make_adm_teacher(tmp), 256, 16 if on_gpu else images, 1, repeats, views
        )
    result["bytes_per_view"] = bytes_per_view
    result["flops_full"], result["flops_early"] = adm_flops_per_view()
    return result


def bench_demo_teacher(device: str, batch: int = 32, repeats: int = 5) -> dict:
    """The demo teacher (assets/demo-teacher, six levels at 64 px): FLOPs per view and bare read-out img/s with and
    without the early stop, one torch thread on CPU (alternating runs, medians)."""
    from teachers.diffusers_unet import DiffusersTeacher
    from teachers.encoding import TeacherEncoder, readout_flops

    teacher = DiffusersTeacher.from_pretrained(str(ROOT / "assets" / "demo-teacher")).eval().to(device)
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    res = teacher.resolution
    x0 = (torch.rand(batch, 3, res, res, generator=g) * 2 - 1).to(device)
    eps = torch.randn(batch, 3, res, res, generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    encoders, seconds, flops = {}, {False: [], True: []}, {}
    for early_stop in (False, True):
        encoders[early_stop] = TeacherEncoder(
            teacher, teacher.default_taps(), mode="noise", t=50, ddim_steps=1, resolution=res, device=device,
            dtype_name="fp32", channels_last=False, early_stop=early_stop,
        )  # fmt: skip
        flops[early_stop] = readout_flops(encoders[early_stop])
        encoders[early_stop](x0, eps)  # warm-up
    for _ in range(repeats):
        for early_stop in (False, True):
            sync()
            start = time.perf_counter()
            encoders[early_stop](x0, eps)
            sync()
            seconds[early_stop].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    whole, early = statistics.median(seconds[False]), statistics.median(seconds[True])
    return {
        "flops_full": flops[False],
        "flops_early": flops[True],
        "batch": batch,
        "res": res,
        "s_full": whole,
        "s_early": early,
        "threads": 1 if device == "cpu" else threads,
        "stop_after": encoders[True].stop_after,
    }


def adm_flops_per_view() -> tuple[int, int]:
    """FLOPs of one ADM-256 view's read-out at T=150, whole UNet and early-stopped, counted on the meta device."""
    from teachers.adm import ADMTeacher, adm_from_flags
    from teachers.adm_presets import preset_flags
    from teachers.encoding import TeacherEncoder, readout_flops

    teacher = ADMTeacher(adm_from_flags(preset_flags("adm-256-uncond"), device="meta")).eval()
    counts = []
    for early_stop in (False, True):
        encoder = TeacherEncoder(
            teacher, teacher.default_taps(), mode="noise", t=150, ddim_steps=1, resolution=256, device="meta",
            dtype_name="fp32", channels_last=False, early_stop=early_stop,
        )  # fmt: skip
        counts.append(readout_flops(encoder))
    return counts[0], counts[1]


def format_tables(unets: list[dict], adm: dict | None, machine: str, demo: dict | None = None) -> str:
    unet = unets[0]
    lines = [f"Machine: {machine}.", ""]
    if demo:
        lines += [
            "| demo teacher (assets/demo-teacher), bare read-out | whole UNet | early stop | ratio |",
            "|---|---|---|---|",
            f"| GFLOP per view | {demo['flops_full'] / 1e9:.3f} | {demo['flops_early'] / 1e9:.3f} "
            f"| {demo['flops_full'] / demo['flops_early']:.2f}x |",
            f"| s per batch of {demo['batch']} at {demo['res']} px, {demo['threads']} thread(s) | {demo['s_full']:.3f} "
            f"| {demo['s_early']:.3f} | {demo['s_full'] / demo['s_early']:.2f}x |",
            "",
            f"The demo teacher has six levels, so its last tap ({demo['stop_after']}, stride 4) leaves two decoder",
            "levels and the output head unrun. The UNet rows below are a four-level UNet whose default taps reach its",
            "top level: there the early stop skips only the output head (GFLOP/view nearly equal).",
            "",
        ]
    lines += [
        "| teacher | params | teacher threads | images (views) | res | batch (views) | GFLOP/view whole / early stop "
        "| bare img/s whole UNet | bare read-out img/s (early stop) | early-stop speed-up "
        "| end-to-end img/s | ratio (range) | bare drift | teacher busy | teacher time / bare | bank MB | MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| UNet2DModel (64,128,256,256), random init | {u['params_m']:.1f}M | {u['threads']} "
            f"| {u['images']} ({u['views']}) | {u['resolution']} | {u['batch']} "
            f"| {u['flops_full'] / 1e9:.3f} / {u['flops_early'] / 1e9:.3f} | {u['bare_full_img_s']:.2f} "
            f"| {u['bare_img_s']:.2f} | {u['early_stop_speedup']:.2f}x "
            f"| {u['e2e_img_s']:.2f} | **{u['ratio']:.2f}** ({u['ratio_range'][0]:.2f}-{u['ratio_range'][1]:.2f}) "
            f"| {u['bare_drift'][0]:.2f}-{u['bare_drift'][1]:.2f} | {u['busy']:.0%} | {u['teacher_vs_bare']:.2f} "
            f"| {u['bank_mb']:.1f} | {u['mb_s']:.2f} |"
            for u in unets
        ),
        "",
        "End-to-end = `run_encode` in-process (`--no-dask`): listing, decoding in worker processes, noise, teacher,",
        "int8 codec, shard file writes, done markers, summary; draws=2, flips=both (4 views per image), T=150. Bare =",
        "the same read-outs on pre-decoded batches of the same composition, stopped after the last tap",
        "(teacher.early_stop, the default): the baseline of the ratio. GFLOP/view = torch.utils.flop_counter of one",
        "view's read-out, whole UNet / stopped after the last tap. Bare img/s whole UNet = the same read-outs with",
        "teacher.early_stop=false; early-stop speed-up = median of its time over the mean of the early-stopped bare",
        "runs around it. Bare and end-to-end runs alternate,",
        f"bare first and last ({unet['repeats']} end-to-end runs); ratio = median over the end-to-end runs of the mean",
        "time of the two bare runs around it / its own time, with the lowest and highest in brackets. Bare drift =",
        "range of each bare run's time over the one before it (1.00 = a quiet machine): the noise floor of a ratio.",
        "The img/s columns are medians.",
        f"bank.shard_rows={unet['shard_rows']}. Two medians explain the ratio (ratio ~ busy / slowdown): teacher",
        "busy = share of the end-to-end wall time spent inside the teacher read-out (the rest: listing, bank",
        "creation, the last shard's write, which overlap cannot hide); teacher time / bare = the teacher's time",
        "inside the encode over its time alone (1.00: not slowed by the decode and write work beside it).",
        "Teacher threads = torch intra-op threads of the teacher (encode.cpu_threads) in both columns. When they take",
        "every core, the decode worker and the writer can only run by taking cores from the teacher; with a core left",
        "free they run beside it, as the host CPU runs them beside a GPU.",
        "Target ratio >= 0.90: "
        + ", ".join(
            f"{u['threads']} teacher thread(s) {'met' if u['ratio'] >= 0.9 else 'not met'}" for u in unets
        )
        + f" (1-min load average {unet['load_avg']:.1f} at the end of the first row's runs).",
    ]
    if adm:
        taps = ", ".join(f"{n} {c}x{h}x{w}" for n, c, h, w in adm["taps"])
        codec_bytes = ", ".join(f"{name} {b / 1e6:.2f} MB" for name, b in adm["bytes_per_view"].items())
        lines += [
            "",
            "| ADM-256 (adm-256-uncond, random weights) | |",
            "|---|---|",
            f"| parameters | {adm['params_m']:.1f}M |",
            f"| taps | {taps} |",
            f"| images (views), batch (views), device | {adm['images']} ({adm['views']}), {adm['batch']}, "
            f"{adm['device']} |",
            f"| TFLOP per view, whole UNet / early stop (input of output_blocks.11.1) | {adm['flops_full'] / 1e12:.3f}"
            f" / {adm['flops_early'] / 1e12:.3f} ({adm['flops_full'] / adm['flops_early']:.2f}x) |",
            f"| bare read-out, whole UNet | {adm['bare_full_img_s']:.4f} img/s |",
            f"| bare read-out, early stop | {adm['bare_img_s']:.4f} img/s "
            f"({adm['views'] / adm['images'] * adm['bare_img_s']:.4f} views/s; {adm['early_stop_speedup']:.2f}x) |",
            f"| end-to-end `run_encode` | {adm['e2e_img_s']:.4f} img/s (ratio **{adm['ratio']:.2f}**, teacher busy "
            f"{adm['busy']:.0%}) |",
            f"| bytes per view (paper's taps) | {codec_bytes} |",
            "",
            "ADM end to end: a random-weights state dict saved as guided-diffusion saves it and loaded by the `adm`",
            "teacher (`weights_only=True`); on CPU one view per image (a read-out takes tens of seconds there).",
            "bitround stores float16 bits (same raw bytes as fp16); its gain needs a compressor (bank.compressor) and",
            "depends on the data.",
        ]
    return "\n".join(lines)


END_MARKER = "<!-- end of the bench-encode output; the notes below are kept by --write-docs -->"


def write_docs(text: str) -> None:
    """Replace the generated part of docs/benchmarks.md's Encode section (up to END_MARKER, kept with the notes)."""
    doc = DOCS.read_text()
    pattern = re.compile(r"(## Encode \(`make bench-encode`\)\n)(.*?)(\n" + re.escape(END_MARKER) + ")", re.S)
    if not pattern.search(doc):
        raise click.ClickException(f"{DOCS} has no Encode section ending in {END_MARKER!r} to fill")
    DOCS.write_text(pattern.sub(lambda m: f"{m.group(1)}\n{text}\n{m.group(3)}", doc, count=1))


@click.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda.")
@click.option("--images", default=96, show_default=True)
@click.option("--resolution", default=32, show_default=True)
@click.option("--batch-size", default=8, show_default=True, help="Views per teacher forward.")
@click.option(
    "--num-workers", default=1, show_default=True, help="Decoding worker processes (encode.num_workers)."
)
@click.option(
    "--repeats",
    default=7,
    show_default=True,
    help="End-to-end runs, each between two bare runs; medians are reported.",
)
@click.option("--no-adm", is_flag=True, help="Skip the ADM-256 rows.")
@click.option("--adm-images", default=2, show_default=True, help="Images for the ADM-256 end-to-end run.")
@click.option("--adm-repeats", default=1, show_default=True)
@click.option(
    "--write-docs",
    "update_docs",
    is_flag=True,
    help="Replace the generated part of docs/benchmarks.md's Encode section.",
)
@click.option("--machine", default="", help="Machine description for the docs (default: detected).")
@click.option(
    "--cpu-threads",
    "thread_counts",
    default="0,1",
    show_default=True,
    help="Comma-separated teacher thread counts (encode.cpu_threads), one UNet row each; 0 = torch's default. "
    "On a GPU the thread count only drives the host side; pass --cpu-threads 0.",
)
def main(
    device: str,
    images: int,
    resolution: int,
    batch_size: int,
    num_workers: int,
    repeats: int,
    no_adm: bool,
    adm_images: int,
    adm_repeats: int,
    update_docs: bool,
    machine: str,
    thread_counts: str,
) -> None:
    """Encode throughput vs bare teacher throughput; ADM-256 facts."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not machine:
        gpu = torch.cuda.get_device_name(0) if device == "cuda" else "no GPU"
        machine = f"{cpu_model()}, {os.cpu_count()} cores, {gpu}"
    default_threads = torch.get_num_threads()
    unets = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp_name:
        tmp = Path(tmp_name)
        make_images(tmp, images, resolution)
        teacher = make_unet_teacher(tmp, resolution)
        for threads in (int(t) for t in thread_counts.split(",")):
            unets.append(
                bench_end_to_end(
                    device, tmp, teacher, resolution, batch_size, num_workers, repeats, (), threads
                )
            )
            torch.set_num_threads(default_threads)  # encode.cpu_threads is process-wide
    demo = bench_demo_teacher(device)
    adm = None if no_adm else bench_adm(device, adm_images, adm_repeats)
    text = format_tables(unets, adm, machine, demo)
    print(text)
    if update_docs:
        write_docs(text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
