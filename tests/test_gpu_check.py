"""``make gpu-check`` cannot rot where there is no GPU: its CPU smoke run builds every row at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    if torch.cuda.is_available():
        return  # measured for real there
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_cpu_smoke_run_fills_every_row(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out), "--site", str(tmp_path / "site")],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    checks = [row[0] for row in rows]
    assert checks[0] == "bf16 matmul peak" and float(rows[0][3]) > 0
    encode = [row for row in rows if "encode" in row[0]]
    assert len(encode) == 1 and "views/s" in encode[0][2] and float(encode[0][3]) > 0
    assert any("distill" in c for c in checks) and any(c.startswith("DDP step (gloo") for c in checks)
    assert "ok" in next(row for row in rows if row[0].startswith("DDP"))[2]
    decode = [row for row in rows if row[0].startswith("bank decode on the device")]
    assert [row[0].split(", ", 1)[1] for row in decode][:4] == ["fp16", "int8", "fp8", "int4"]
    assert all("of the step" in row[2] for row in decode)
    assert "| check | setting | result |" in proc.stdout
