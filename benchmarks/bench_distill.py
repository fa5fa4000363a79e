"""Distill benchmark: what the cache buys per training step, and how long a step waits on the bank loader.

(1) Time per training step, ResNet-50 student + regressor at 256x256, targets read from a bank (int8, ADM-256 tap
    shapes) vs computed online by an ADM-256-sized teacher (random weights: speed does not depend on the values)
    from the same rows' pixels and noise.
(2) Fraction of step time spent waiting on data with the default loader settings (``distill.num_workers`` etc.).

Bank mode runs the real ``run_distill`` (loader, decode, step, metrics); its figures come from metrics.jsonl.
Online mode drives the same ``Trainer`` with the teacher encoder as its target function (what ``distill.targets=replay`` does,
without needing a 2.2 GB random checkpoint on disk). Usage: ``make bench-distill [ARGS="--batch 2 ..."]``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import cpu_model, synced

from bank import BankWriter, ShardRows, make_loader, spec_from_config
from bank.config import BankConfig
from bank.projection import even_split
from distill.model import DistillNet
from distill.student import build_student
from distill.train import build_optimizer, build_schedule, run_distill
from distill.trainer import StepSettings, Trainer
from dreamteacher.resolve import resolve
from dreamteacher.schema import load_pipeline
from teachers.adm import ADMTeacher, adm_default_taps, adm_from_flags, adm_tap_shapes
from teachers.adm_presets import preset_flags
from teachers.encoding import TeacherEncoder, make_noise
from training.metrics import read_metrics
from training.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
PRESET = "adm-256-uncond"
T = 150


def write_bench_bank(path: Path, num_images: int) -> Path:
    """Bank with ADM-256 level shapes; features synthesised (lognormal-scaled channels) since speed is the point."""
    taps = adm_tap_shapes(PRESET)
    cfg = BankConfig(shard_rows=16, codec="int8")
    spec = spec_from_config(
        [t.as_dict() for t in taps],
        cfg,
        num_images=num_images,
        draws=1,
        flips=1,
        image_size=256,
        attributes={"benchmark": "distill", "features": "synthetic"},
    )
    writer = BankWriter.create(path, spec, cfg, overwrite=True)
    rng = np.random.default_rng(0)
    for shard in range(spec.num_shards):
        rows = np.arange(spec.shard_range(shard).start, spec.shard_range(shard).stop)
        feats = {
            t.name: (
                rng.standard_normal((len(rows), t.channels, t.height, t.width), dtype=np.float32)
                * rng.lognormal(0, 1, size=(1, t.channels, 1, 1)).astype(np.float32)
            )
            for t in taps
        }
        writer.write_shard(
            shard,
            ShardRows(
                images_u8=rng.integers(0, 256, (len(rows), 3, 256, 256), dtype=np.uint8),
                features=feats,
                keys=[f"img{r}" for r in rows],
                source_index=rows,
                draw=np.zeros(len(rows), np.int64),
                flip=np.zeros(len(rows), np.int64),
                seed=rows + 1,
                ok=np.ones(len(rows), bool),
            ),
        )
    writer.finalize({})
    return path


def bench_bank_mode(
    bank: Path,
    out: Path,
    batch: int,
    steps: int,
    warmup: int,
    *,
    student: str = "resnet50",
    extra: tuple[str, ...] = (),
) -> dict[str, float]:
    """Real run_distill with the config's default loader settings; per-step figures from metrics.jsonl.
    ``extra``: further ``KEY.PATH=VALUE`` overrides (gpu-check's device)."""
    cfg = load_pipeline(
        REPO / "pipeline.yaml",
        [
            f"distill.bank={bank}",
            f"distill.out={out}",
            "distill.exp=bench-bank",
            f"distill.student.name={student}",
            f"distill.batch_size={batch}",
            f"distill.max_steps={warmup + steps}",
            "distill.log_every=1",
            f"distill.checkpoint_every={10**9}",
            *extra,
        ],
    )
    run_distill(resolve(cfg, "distill"), progress=False)
    records = read_metrics(out / "bench-bank" / "metrics.jsonl")[warmup:]
    step_s = [batch / r["images_per_s"] for r in records]
    return {
        "step_s": statistics.median(step_s),
        "wait_frac": statistics.mean(r["data_wait_frac"] for r in records),
        "num_workers": cfg.distill.num_workers,
    }


def bench_online_mode(bank: Path, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Same student step; targets from an ADM-256 teacher (random init) on the rows' pixels and noise."""
    device = torch.device("cpu")
    unet = adm_from_flags(preset_flags(PRESET))  # random weights, float32
    teacher = ADMTeacher(unet, preset=PRESET).eval().requires_grad_(False)
    taps = adm_default_taps(unet)
    encoder = TeacherEncoder(
        teacher,
        taps,
        mode="noise",
        t=T,
        ddim_steps=0,
        resolution=256,
        device=device,
        dtype_name="fp32",
        channels_last=False,
    )
    teacher_s: list[float] = []

    def targets(batch_dict: dict) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        x0 = batch_dict["image"].float() / 127.5 - 1.0
        eps = make_noise(
            [int(s) for s in batch_dict["seed"]], [bool(f) for f in batch_dict["flip"]], (3, 256, 256)
        )
        feats = {k: v.clone() for k, v in encoder(x0, eps).items()}
        teacher_s.append(time.perf_counter() - start)
        return feats

    cfg = load_pipeline(REPO / "pipeline.yaml", ["distill.max_steps=100"]).distill
    channels = {info.name: info.channels for info in encoder.taps_info}
    net = DistillNet(build_student("resnet50"), channels)
    optimizer = build_optimizer(net, cfg)
    scheduler, _ = build_schedule(optimizer, cfg, steps_per_epoch=100)
    trainer = Trainer(
        net,
        net,
        optimizer,
        scheduler,
        targets,
        StepSettings(whiten="sample", at_weight=10.0, grad_clip=3.0),
        Runtime(device),
    )
    loader, _ = make_loader(bank, batch, num_workers=0, pin_memory=False, levels=[])
    times = []
    for i, batch_dict in enumerate(loader):
        if i == warmup + steps:
            break
        start = time.perf_counter()
        trainer.train_step(batch_dict)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[warmup:]), "teacher_s": statistics.median(teacher_s[warmup:])}


DECODE_VARIANTS = [
    ("fp16", "fp16", {}),
    ("int8", "int8", {}),
    ("fp8", "fp8", {}),
    ("int4", "int4", {}),
    ("int4 + PCA s4 k=256", "int4", {"s4": 256}),
    ("int4 + PCA s4 k=128", "int4", {"s4": 128}),
    # bank.projection_budget=0.4, its values split as k = 0.4 C at every level. The matmuls' work, sum_l k_l C_l H_l
    # W_l, of any split of the same values lies within -10 % / +15 % of this one's at ADM-256 (all of the budget
    # on the C = 512 levels / the C = 1024 levels whole, the rest at C = 512)
    (
        "int4 + PCA budget 0.4 (k = 0.4 C)",
        "int4",
        even_split({t.name: t.channels for t in adm_tap_shapes(PRESET)}, 0.4),
    ),
]
"""(label, codec, k per projected level) of each decode-cost row."""


def bench_decode_cost(
    batch: int, steps: int, warmup: int, device: torch.device | None = None, student: str = "resnet50"
) -> dict:
    """Device decode of one batch's bank payload per codec (``decode_targets``: the copy from pinned memory, the
    dequantisation and for a PCA level the matmul back to C channels), against the student step (``student`` +
    regressor at 256x256, targets given; bf16 autocast and channels_last on CUDA, as distill runs)."""
    from bank import decode_targets, make_codec
    from bank.projection import Projection

    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    taps = adm_tap_shapes(PRESET)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device).manual_seed(0)
    feats = {  # made and encoded on the device: on a GPU machine, a CPU encode of batch 256 would take minutes
        t.name: torch.randn(batch, t.channels, t.height, t.width, generator=gen, device=device)
        * torch.from_numpy(rng.lognormal(0, 1, size=(1, t.channels, 1, 1)).astype(np.float32)).to(device)
        for t in taps
    }
    decode_s: dict[str, float] = {}
    for label, codec_name, pca in DECODE_VARIANTS:
        codec = make_codec(codec_name)
        projections, payload = {}, {}
        for name, x in feats.items():
            if name in pca:  # any orthonormal basis: the decode's cost does not depend on it
                c = x.shape[1]
                basis = torch.linalg.qr(
                    torch.randn(c, pca[name], generator=torch.Generator().manual_seed(0))
                )[0]
                projections[name] = Projection(torch.zeros(c), basis.T.contiguous()).to(device)
                x = projections[name].project(x)
            # on the host, as the loader hands a batch over (pinned on CUDA: pin_memory)
            payload[name] = {part: v.cpu() for part, v in codec.encode(x).items()}
            if cuda:
                payload[name] = {part: v.pin_memory() for part, v in payload[name].items()}
        decode_targets(payload, device, projections=projections)  # warm-up (allocator, kernels)
        times = []
        for _ in range(7):
            start = synced(device)
            decode_targets(payload, device, projections=projections)
            times.append(synced(device) - start)
        decode_s[label] = statistics.median(times)
    # the student step with fixed float targets (the decode excluded)
    targets = {name: x.to(device) for name, x in feats.items()}
    cfg = load_pipeline(REPO / "pipeline.yaml", ["distill.max_steps=100"]).distill
    net = DistillNet(build_student(student), {t.name: t.channels for t in taps}).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, cfg)
    scheduler, _ = build_schedule(optimizer, cfg, steps_per_epoch=100)
    runtime = Runtime(device, amp=cuda, channels_last=cuda)
    trainer = Trainer(net, net, optimizer, scheduler, lambda b: targets,
                      StepSettings(whiten="sample", at_weight=10.0, grad_clip=3.0), runtime)  # fmt: skip
    images = {"image": torch.from_numpy(rng.integers(0, 256, (batch, 3, 256, 256), dtype=np.uint8))}
    step_times = []
    for _ in range(warmup + steps):
        start = synced(device)
        trainer.train_step(images)
        step_times.append(synced(device) - start)
    return {"decode_s": decode_s, "step_s": statistics.median(step_times[warmup:]), "batch": batch}


def decode_cost_lines(result: dict) -> list[str]:
    step = result["step_s"]
    lines = [
        f"Device decode per codec at ADM-256 shapes, batch {result['batch']}, on this CPU (the decode runs where "
        f"the training step runs; a GPU's figures will differ). Student step (ResNet-50 + regressor, fixed "
        f"targets): {step:.2f} s.",
        "",
        "| codec | decode ms / batch | % of the student step |",
        "|---|---|---|",
    ]
    for label, seconds in result["decode_s"].items():
        lines.append(f"| {label} | {1e3 * seconds:.1f} | {100 * seconds / step:.2f}% |")
    lines += [
        "",
        "Target on the device: <= 2% of the step; `make gpu-check` measures it on a CUDA GPU at batch 256 (not run yet).",
    ]
    return lines


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"no GPU; 1-min load average {os.getloadavg()[0]:.1f} at the end"
    )


def write_doc(text: str) -> None:
    """Replace the Distill section's body in docs/benchmarks.md (up to the next heading or the end)."""
    doc = REPO / "docs" / "benchmarks.md"
    content = doc.read_text()
    pattern = re.compile(r"(## Distill \(`make bench-distill`\)\n)(.*?)(?=\n## |\Z)", re.S)
    if not pattern.search(content):
        raise ValueError(f"{doc} has no '## Distill (`make bench-distill`)' section")
    doc.write_text(pattern.sub(lambda m: m.group(1) + "\n" + text.rstrip() + "\n", content, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="images per step (CPU-sized)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--no-doc", action="store_true", help="print only; do not edit docs/benchmarks.md")
    parser.add_argument("--decode-batch", type=int, default=8, help="images per step of the decode-cost part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        tmp_path = Path(tmp)
        bank = write_bench_bank(
            tmp_path / "bank.zarr", num_images=max(16, args.batch * (args.steps + args.warmup))
        )
        bank_mode = bench_bank_mode(bank, tmp_path / "runs", args.batch, args.steps, args.warmup)
        online = bench_online_mode(bank, args.batch, args.steps, args.warmup)
    decode = bench_decode_cost(args.decode_batch, 2, 1)
    ratio = online["step_s"] / bank_mode["step_s"]
    text = "\n".join(
        [
            f"Measured on: {machine()}. ResNet-50 student + FPN/PPM regressor at 256x256, batch {args.batch}, "
            f"median of {args.steps} steps after {args.warmup} warm-up step(s), float32. Teacher: ADM-256 "
            f"({PRESET} flags, random weights, T={T}, taps 1024x8x8, 1024x16x16, 512x32x32, 512x64x64). Bank: int8, "
            "synthetic features at those shapes.",
            "",
            "| targets | s / step | teacher s / step | images / s |",
            "|---|---|---|---|",
            f"| bank (int8, run_distill) | {bank_mode['step_s']:.2f} | 0 | {args.batch / bank_mode['step_s']:.2f} |",
            f"| online (ADM-256 teacher) | {online['step_s']:.2f} | {online['teacher_s']:.2f} | "
            f"{args.batch / online['step_s']:.2f} |",
            "",
            f"Online / bank step time: **{ratio:.1f}x**.",
            "",
            f"Data wait with the default loader (distill.num_workers={bank_mode['num_workers']}): "
            f"**{100 * bank_mode['wait_frac']:.1f}%** of step time (target < 5%).",
            "",
            *decode_cost_lines(decode),
        ]
    )
    print(text)
    if not args.no_doc:
        write_doc(text)


if __name__ == "__main__":
    main()
