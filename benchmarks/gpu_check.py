"""``make gpu-check``: the GPU hot paths measured on one CUDA GPU, as one markdown table, in under 8 minutes.

Rows: the ``gpu``-marked tests; the GPU's bf16 matmul peak (measured here); ADM-256 (random weights) encode
views/s at batch 16/32/64/128 in bf16, channels_last, early stop, SDPA, eager and ``torch.compile``d, as TFLOP/s
(early-stopped FLOPs, ``torch.utils.flop_counter``) and as a share of that peak; ResNet-50 + regressor distill
img/s at 256 px bf16 with the data-wait share (the real ``run_distill`` on a synthetic ADM-256-shaped bank); one
single-process NCCL DDP step; the peak memory of each. Goals (docs/benchmarks.md): encode >= 40% of the peak,
distill >= 1,500 img/s with data wait < 5%.

It runs on a machine whose own Python 3.12 has torch, torchvision, timm, safetensors and tensorboard but not this
project's other dependencies and no network: ``make gpu-wheels`` (here, with network) downloads those as wheels
into ``.gpu-wheels/``; this script unpacks the missing ones into a scratch folder and puts it on ``sys.path``.
Without a CUDA GPU it says so and exits 0. ``--cpu-smoke`` runs every row at toy size on the CPU (tests/test_gpu_check.py
does), so the script cannot rot unnoticed where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from timing import synced  # noqa: E402

NEEDED = ("diffusers", "zarr", "numcodecs", "google_crc32c", "crc32c", "webdataset", "dask", "distributed", "pycocotools",
          "click", "braceexpand", "pytest")  # fmt: skip
"""Modules gpu-check imports that the GPU machine's Python lacks (unpacked from the wheels)."""
PROVIDED = ("torch", "torchvision", "timm", "safetensors", "tensorboard", "numpy", "PIL", "yaml", "tqdm")
"""Modules the GPU machine's Python must already have."""
BATCHES = (16, 32, 64, 128)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack every wheel in ``wheels`` into ``site`` (a wheel is a zip laid out as site-packages) when a needed
    module is missing; put ``site`` first on ``sys.path`` and PYTHONPATH. Returns the wheels unpacked."""
    missing = [m for m in NEEDED if not _importable(m)]
    if not missing:
        return []
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        sys.exit(f"gpu-check: modules {missing} are missing and {wheels} has no wheels; run `make gpu-wheels` "
                 "on a machine with network and carry .gpu-wheels/ along")  # fmt: skip
    site.mkdir(parents=True, exist_ok=True)
    for file in files:
        with zipfile.ZipFile(file) as wheel:
            wheel.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    still = [m for m in NEEDED if not _importable(m)]
    if still:
        sys.exit(f"gpu-check: {still} still missing after unpacking {wheels}; re-run `make gpu-wheels`")
    return [f.name for f in files]


class Table:
    """Rows of the one markdown table; each section appends (check, setting, result, TFLOP/s, % of peak, memory)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(
        self, check: str, setting: str, result: str, tflops: str = "", share: str = "", mem: str = ""
    ) -> None:
        self.rows.append((check, setting, result, tflops, share, mem))
        print("  ", " | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        head = "| check | setting | result | TFLOP/s | share of bf16 peak | peak memory |\n|---|---|---|---|---|---|"
        return "\n".join([head, *("| " + " | ".join(r) + " |" for r in self.rows)])


def _reset_memory(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _memory(device) -> str:  # noqa: ANN001
    import torch

    return (
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (cpu)"
    )


def gpu_tests(table: Table, timeout_s: int) -> None:
    """The ``gpu``-marked tests, in a subprocess with the unpacked wheels on PYTHONPATH."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
        summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        if proc.returncode not in (0, 5):
            print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    except subprocess.TimeoutExpired:
        summary = f"timed out after {timeout_s} s"
    table.add("gpu-marked tests", f"{len(files)} files", f"{summary} ({time.perf_counter() - start:.0f} s)")


def matmul_peak(table: Table, device, n: int, iters: int) -> float:  # noqa: ANN001
    """Measured bf16 matmul throughput (TFLOP/s) of n x n x n products: the peak the other rows are a share of."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start = synced(device)
    for _ in range(iters):
        a @ b
    tflops = 2 * n**3 * iters / (synced(device) - start) / 1e12
    table.add(
        "bf16 matmul peak", f"{n}x{n}x{n}, {iters} products", f"{tflops:.3g} TFLOP/s", f"{tflops:.3g}", "100%"
    )
    return tflops


def _adm(flags: dict, device):  # noqa: ANN001, ANN202
    import torch

    from teachers.adm import ADMTeacher, adm_from_flags, set_attention
    from teachers.registry import freeze

    torch.manual_seed(0)
    teacher = ADMTeacher(adm_from_flags(flags))
    set_attention(teacher.unet, "sdpa")
    return freeze(teacher, device, channels_last=True)


def adm_encode(table: Table, device, flags: dict, batches: tuple[int, ...], peak: float, *, compile: bool,  # noqa: ANN001
               iters: int, deadline: float, label: str) -> None:  # fmt: skip
    """Early-stopped read-out views/s (bf16, channels_last, SDPA) per batch size; FLOPs counted on the meta device."""
    import torch

    from teachers.adm import ADMTeacher, adm_from_flags
    from teachers.encoding import TeacherEncoder, readout_flops

    res = int(flags["image_size"])
    meta = ADMTeacher(adm_from_flags(flags, device="meta")).eval()
    flops = readout_flops(TeacherEncoder(
        meta, meta.default_taps(), mode="noise", t=150, ddim_steps=1, resolution=res, device="meta",
        dtype_name="fp32", channels_last=False,
    ))  # fmt: skip
    teacher = _adm(flags, device)
    encoder = TeacherEncoder(
        teacher, teacher.default_taps(), mode="noise", t=150, ddim_steps=1, resolution=res, device=device,
        dtype_name="bf16", channels_last=True, compile=compile,
    )  # fmt: skip
    mode = "compiled" if compile else "eager"
    for batch in batches:
        if time.perf_counter() > deadline:
            table.add(f"{label} encode, {mode}", f"batch {batch}", "skipped: time budget spent")
            continue
        _reset_memory(device)
        x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
        eps = torch.randn(batch, 3, res, res, device=device)
        start = time.perf_counter()
        for _ in range(2):  # warm-up; compiles on the first call of each shape
            encoder(x0, eps)
        warm_s = synced(device) - start
        start = time.perf_counter()
        for _ in range(iters):
            encoder(x0, eps)
        views_s = batch * iters / (synced(device) - start)
        tflops = views_s * flops / 1e12
        note = f", first calls {warm_s:.0f} s" if compile else ""
        table.add(f"{label} encode, {mode}", f"batch {batch}, bf16, channels_last, early stop, SDPA",
                  f"{views_s:.3g} views/s{note}", f"{tflops:.3g}", f"{tflops / peak:.0%}" if peak else "",
                  _memory(device))  # fmt: skip
    del encoder, teacher


def distill(table: Table, device, *, student: str, images: int, batch: int, steps: int, warmup: int) -> None:  # noqa: ANN001
    """The real run_distill (loader, decode, bf16 step, metrics) on a synthetic ADM-256-shaped int8 bank."""
    from bench_distill import bench_bank_mode, write_bench_bank

    _reset_memory(device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-distill-") as tmp_name:
        tmp = Path(tmp_name)
        bank = write_bench_bank(tmp / "bank.zarr", images)
        got = bench_bank_mode(bank, tmp / "runs", batch, steps, warmup, student=student,
                              extra=(f"distill.device={device.type}",))  # fmt: skip
    table.add(f"{student} + regressor distill", f"256 px, batch {batch}, bf16 autocast on CUDA, {got['num_workers']} "
              f"loader workers, {images}-image bank", f"{batch / got['step_s']:.0f} img/s, data wait "
              f"{got['wait_frac']:.1%}", mem=_memory(device))  # fmt: skip


def decode_cost(table: Table, device, *, student: str, batch: int, steps: int, warmup: int) -> None:  # noqa: ANN001
    """Issue 13's device decode per codec at ADM-256 shapes (copy from pinned memory, dequantise, PCA matmul)
    against the student step at the same batch (target: <= 2 % of it)."""
    from bench_distill import bench_decode_cost

    _reset_memory(device)
    got = bench_decode_cost(batch, steps, warmup, device=device, student=student)
    step = got["step_s"]
    for label, seconds in got["decode_s"].items():
        table.add(f"bank decode on the device, {label}", f"ADM-256 shapes, batch {batch}; {student} step "
                  f"{1e3 * step:.0f} ms", f"{1e3 * seconds:.1f} ms, {seconds / step:.2%} of the step",
                  mem=_memory(device))  # fmt: skip


def ddp_step(table: Table, device, *, student: str, batch: int, res: int) -> None:  # noqa: ANN001
    """One-process DDP (NCCL on CUDA, gloo on CPU): a few student steps through DistributedDataParallel."""
    import socket

    import torch
    import torch.distributed as dist

    from distill.model import DistillNet
    from distill.student import build_student

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _reset_memory(device)
        net = DistillNet(build_student(student), {"s8": 64, "s16": 64}, channels=64).to(device)
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index or 0] if device.type == "cuda" else None
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.randn(batch, 3, res, res, device=device)
        times = []
        for _ in range(3):
            start = synced(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x)
            loss = sum(v.float().pow(2).mean() for v in out.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(synced(device) - start)
        ok = all(torch.isfinite(p).all() for p in net.parameters())
        table.add(f"DDP step ({backend}, 1 process)", f"{student}, batch {batch}, {res} px",
                  f"{'ok' if ok else 'NON-FINITE'}, {batch / statistics.median(times[1:]):.0f} img/s", mem=_memory(device))  # fmt: skip
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every row at toy size on the CPU")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--site", type=Path, default=None, help="scratch folder the wheels are unpacked into")
    parser.add_argument("--budget-s", type=float, default=450, help="skip the remaining rows after this long")
    parser.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a CUDA machine (after `make gpu-wheels` here), or `--cpu-smoke` for a toy CPU run.")  # fmt: skip
        return 0
    missing = [m for m in PROVIDED if not _importable(m)]
    if missing:
        sys.exit(f"gpu-check: this Python lacks {missing}, which the GPU machine is expected to have")
    site = args.site or Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    unpacked = install_wheels(args.wheels, site)
    if unpacked:
        print(f"gpu-check: unpacked {len(unpacked)} wheels from {args.wheels} into {site}")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    table = Table()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run: toy sizes)"
    print(f"gpu-check on {name}, torch {torch.__version__}, Python {sys.version.split()[0]}")

    if args.cpu_smoke:
        adm_flags = json.loads((ROOT / "tests" / "data" / "adm-tiny" / "flags.json").read_text())
        batches, iters, student, images, dbatch, steps, warmup, n = (2,), 1, "resnet18", 4, 2, 2, 1, 256
    else:
        from teachers.adm_presets import preset_flags

        adm_flags = preset_flags("adm-256-uncond")
        batches, iters, student, images, dbatch, steps, warmup, n = (
            BATCHES,
            5,
            "resnet50",
            512,
            256,
            20,
            5,
            8192,
        )
    label = "ADM-256 (random weights)" if not args.cpu_smoke else "ADM adm-tiny flags (random weights)"
    if not args.no_tests and not args.cpu_smoke:
        gpu_tests(table, timeout_s=150)
    peak = matmul_peak(table, device, n, 50 if device.type == "cuda" else 2)
    adm_encode(
        table, device, adm_flags, batches, peak, compile=False, iters=iters, deadline=deadline, label=label
    )
    distill(table, device, student=student, images=images, batch=dbatch, steps=steps, warmup=warmup)
    decode_cost(table, device, student=student, batch=dbatch, steps=5 if device.type == "cuda" else 1, warmup=2
                if device.type == "cuda" else 1)  # fmt: skip
    ddp_step(
        table,
        device,
        student=student,
        batch=64 if device.type == "cuda" else 2,
        res=256 if device.type == "cuda" else 64,
    )
    if not args.no_compile and not args.cpu_smoke:
        adm_encode(table, device, adm_flags, batches[::-1], peak, compile=True, iters=iters, deadline=deadline,
                   label=label)  # fmt: skip
    text = table.markdown()
    print(f"\n{name}, {time.perf_counter() - start:.0f} s\n\n{text}")
    print("\nGoals: encode >= 40% of the bf16 peak on the early-stopped FLOPs (>= 325 views/s on an H200-class GPU); "
          "distill >= 1,500 img/s with data wait < 5%; bank decode <= 2% of the student step.")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": table.rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
