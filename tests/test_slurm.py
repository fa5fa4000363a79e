"""``dreamteacher encode --slurm N``: the dask-jobqueue SLURMCluster built from ``encode.slurm`` (issue 19 item 4).

1. The generated job script (``cluster.job_script()``) asks SLURM for what the config says (GPUs, CPUs, memory,
   walltime, partition, account) and runs a non-daemonic dask worker with the GPU resource, from the prologue's
   environment: checked without submitting anything.
2. The whole path on this machine: ``sbatch`` / ``scancel`` stand-ins on PATH run each job script as a local
   process group (what SLURM would run on a node), so ``--slurm 2`` submits two jobs, encodes on their workers,
   cancels them at the end, and the bank equals an in-process encode byte for byte. No process is left.

Skipped when dask-jobqueue is not installed (``pip install -e '.[slurm]'``).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dreamteacher.schema import load_pipeline

try:
    import dask_jobqueue  # noqa: F401
except ImportError:
    HAVE_JOBQUEUE = False
else:
    HAVE_JOBQUEUE = True
needs_jobqueue = pytest.mark.skipif(
    not HAVE_JOBQUEUE, reason="dask-jobqueue is an optional extra: pip install -e '.[slurm]'"
)

from test_scaleout_dask import NUM_IMAGES, array_files, assets, marked, overrides, reference  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]


def slurm_cfg(*extra: str):  # noqa: ANN201 - EncodeConfig
    return load_pipeline(REPO / "pipeline.yaml", list(extra)).encode


def directives(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")
    ]


@needs_jobqueue
def test_job_script_asks_for_the_configured_job() -> None:
    from encode.distributed import make_slurm_cluster

    enc = slurm_cfg(
        "encode.tasks_per_worker=2",
        "encode.slurm.queue=gpu",
        "encode.slurm.account=proj42",
        "encode.slurm.gpus=1",
        "encode.slurm.cpus=10",
        "encode.slurm.memory=64GB",
        "encode.slurm.walltime=12:00:00",
        "encode.slurm.python=/shared/dreamteacher/.venv/bin/python",
        'encode.slurm.prologue=["module load cuda/12.4", "cd /shared/dreamteacher"]',
        'encode.slurm.directives=["--constraint=a100"]',
    )
    with make_slurm_cluster(enc) as cluster:
        script = cluster.job_script()
        address = cluster.scheduler_address
    lines = directives(script)
    assert "-p gpu" in lines and "-A proj42" in lines and "-t 12:00:00" in lines
    assert "--gres=gpu:1" in lines and "--constraint=a100" in lines
    assert "--cpus-per-task=10" in lines
    # --mem in whole GiB, rounded up: 64 GB = 64e9 bytes
    assert f"--mem={math.ceil(64e9 / 2**30)}G" in lines
    body = [line for line in script.splitlines() if line and not line.startswith("#")]
    # the prologue runs first, then the non-daemonic environment, then the worker
    assert body[:3] == [
        "module load cuda/12.4",
        "cd /shared/dreamteacher",
        "export DASK_DISTRIBUTED__WORKER__DAEMON=False",
    ]
    worker = body[-1]
    assert worker.startswith(
        "/shared/dreamteacher/.venv/bin/python -m distributed.cli.dask_worker " + address
    )
    assert "--nthreads 2" in worker and "--resources GPU=1" in worker and "--nanny" in worker


@needs_jobqueue
def test_cpu_jobs_ask_for_no_gpu() -> None:
    from encode.distributed import make_slurm_cluster

    enc = slurm_cfg("encode.slurm.gpus=0", "encode.slurm.cpus=4", "encode.tasks_per_worker=1")
    with make_slurm_cluster(enc) as cluster:
        script = cluster.job_script()
    assert not [d for d in directives(script) if "gres" in d]
    assert "--resources" not in script and "--nthreads 1" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script  # default: the driver's own Python


FAKE_SBATCH = """#!/usr/bin/env bash
# SLURM stand-in: keep the script (the caller deletes it), run it as its own process group, print a job id.
set -e
job="$FAKE_SLURM_DIR/job-$$.sh"
cp "$1" "$job"
setsid bash "$job" > "$job.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""

FAKE_SCANCEL = """#!/usr/bin/env bash
for id in "$@"; do kill -TERM -- "-$id" 2>/dev/null || true; done
"""


@needs_jobqueue
@pytest.mark.slow
def test_slurm_jobs_encode_the_in_process_bytes(assets: Path, reference: Path, tmp_path: Path) -> None:  # noqa: F811
    bin_dir, marker = tmp_path / "bin", uuid.uuid4().hex
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "DREAMTEACHER_TEST_MARK": marker,
        "OMP_NUM_THREADS": "1",
    }
    bank = tmp_path / "slurm.zarr"
    cmd = [
        sys.executable, "-m", "dreamteacher", "encode", "--slurm", "2", "--config", str(REPO / "pipeline.yaml"),
        *overrides(assets, bank), "encode.slurm.gpus=0", "encode.slurm.memory=4GB", "encode.slurm.interface=lo",
        "encode.slurm.wait_minutes=4",
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "submitted 2 SLURM job(s)" in done.stdout
        line = next(line for line in done.stdout.splitlines() if line.startswith("workers "))
        assert sum(int(n) for n in re.findall(r" (\d+) shards", line)) == NUM_IMAGES
        assert len(list(tmp_path.glob("job-*.sh"))) == 2
    finally:
        deadline = time.monotonic() + 20  # scancel's TERM: the workers close, then exit
        while marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [" ".join(p.cmdline())[:120] for p in marked(marker)]
        for proc in marked(marker):
            proc.kill()
    assert left == [], f"processes left behind: {left}"
    assert array_files(bank) == array_files(reference)


def test_cli_slurm_flag_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dreamteacher.cli import main

    runner = CliRunner()
    base = ["encode", "--config", str(REPO / "pipeline.yaml"), f"encode.bank={tmp_path / 'b.zarr'}"]
    result = runner.invoke(main, [*base, "--slurm", "2", "--no-dask"])
    assert result.exit_code == 2 and "--no-dask, --scheduler and --slurm exclude each other" in result.output
    result = runner.invoke(main, [*base, "--slurm", "0"])
    assert result.exit_code == 2 and "--slurm" in result.output
    # without the optional extra: one line naming the install command, before anything is encoded
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    monkeypatch.chdir(REPO)
    result = runner.invoke(main, [*base, "--slurm", "2"])
    assert result.exit_code == 1, result.output
    assert "--slurm needs dask-jobqueue: pip install -e '.[slurm]'" in result.output
    assert not (tmp_path / "b.zarr").exists()
