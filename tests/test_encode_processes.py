"""A dask encode leaves no process behind: its decoding pool is shut down with the worker (issue 18 item 4).

Before the fix every dask worker left its forkserver, decoding workers and resource tracker running after the
encode exited (re-parented to init), and a caller that captured the command's output waited on them forever. The
test marks the encode's environment and looks for any process that still carries the mark once it has exited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from sources.demo_scenes import scene_for
from tests.processes import marked

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dask_encode_leaves_no_process_behind(tmp_path: Path) -> None:
    (tmp_path / "scenes").mkdir()
    for i in range(8):
        Image.fromarray(scene_for("unlabeled", i).image_HW3).save(tmp_path / "scenes" / f"{i}.png")
    marker = uuid.uuid4().hex
    env = {**os.environ, "DREAMTEACHER_TEST_MARK": marker}
    command = [
        sys.executable, "-m", "dreamteacher", "encode", "--quiet", "--config", str(REPO / "pipeline.yaml"),
        f"datasets.few={{root: {tmp_path / 'scenes'}, layout: folder, teacher: demo, t: 50}}",
        f"teachers.demo.path={REPO / 'assets/demo-teacher'}", "encode.data=few", f"encode.bank={tmp_path / 'b.zarr'}",
        "encode.num_workers=2", "encode.draws=1", "encode.flips=none", "bank.shard_rows=4",
    ]  # fmt: skip
    log = tmp_path / "encode.log"
    try:
        with log.open("w") as out:  # a file, not a pipe: a leaked child holding a pipe would hang the test
            result = subprocess.run(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300, cwd=REPO
            )
        assert result.returncode == 0, log.read_text()[-2000:]
        # (the nanny may still log "Worker process still alive after 4.0 seconds, killing" on a loaded machine:
        # the worker's own exit is slow then, but its decoding pool was shut down before the kill)
        deadline = time.monotonic() + 10
        while marked(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [" ".join(p.cmdline())[:120] for p in marked(marker)]
        assert left == [], f"processes left behind by the encode: {left}"
    finally:
        for proc in marked(marker):
            proc.kill()
