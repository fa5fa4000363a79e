"""Multi-node torchrun on one machine: two "nodes" (two torchrun agents, one process each, gloo) on 127.0.0.1.

The runbook of docs/distill.md: every node runs
``torchrun --nnodes=2 --node-rank=R --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=ID``.
The test checks what a multi-node run must get right: each epoch's images are split between the ranks (together
every image once), the ranks hold the same weights at the end (each rank saves its parameters from the live
model: this file is also the launcher torchrun runs, see ``__main__``), the checkpoint holds them, and a run
stopped and resumed on two nodes ends where an uninterrupted one does (issue 19 item 5).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from processes import free_port, marked  # tests/ is on sys.path under pytest and when torchrun runs this file

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
WEIGHTS_ENV = "DREAMTEACHER_TEST_WEIGHTS_DIR"
COPY_ENV = "DREAMTEACHER_TEST_COPY_STEP2"


def run_two_nodes(args: list[str], tmp: Path, name: str, timeout: float = 300) -> None:
    """``dreamteacher ARGS`` as two torchrun nodes on 127.0.0.1 (c10d rendezvous); every process is gone after."""
    marker, port = uuid.uuid4().hex, free_port()
    weights = tmp / f"weights-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DREAMTEACHER_TEST_MARK": marker, WEIGHTS_ENV: str(weights)}
    procs = []
    try:
        for node in range(2):
            cmd = [
                str(TORCHRUN), "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={name}", "--max-restarts=0",
                str(Path(__file__)), *args,
            ]  # fmt: skip
            log = (tmp / f"{name}-node{node}.log").open("w")
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        for node, proc in enumerate(procs):
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, (tmp / f"{name}-node{node}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        end = time.monotonic() + 10
        while marked(marker) and time.monotonic() < end:
            time.sleep(0.3)
        left = [" ".join(p.cmdline())[:120] for p in marked(marker)]
        for proc in marked(marker):
            proc.kill()
        assert left == [], f"processes left behind: {left}"


def rank_weights(tmp: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(tmp / f"weights-{name}" / f"rank{r}.pt", weights_only=True) for r in range(2)]


def distill_args(bank: Path, out: Path, exp: str, *extra: str) -> list[str]:
    # 16 images, global batch 8 over 2 ranks: an epoch is 2 steps of 4 images per rank; 4 steps = 2 epochs
    return [
        "distill", "--no-progress", "--config", str(REPO / "pipeline.yaml"), f"distill.bank={bank}",
        f"distill.out={out}", "distill.student.name=resnet18", "distill.batch_size=8", "distill.num_workers=0",
        "distill.regressor.channels=8", "distill.max_steps=4", "distill.log_every=1", f"distill.exp={exp}",
        "distill.audit_rows=true", "distill.device=cpu", "distill.flip=random", "distill.draw=random", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_distill_train import write_bank

    return write_bank(tmp_path_factory.mktemp("bank") / "tiny.zarr")


@pytest.mark.slow  # a pair of fresh Python processes importing torch + timm
def test_two_node_distill_with_gradient_accumulation_keeps_ranks_identical(
    bank: Path, tmp_path: Path
) -> None:
    # 4 images per rank per step in 2 micro-batches of 2: DDP skips the all-reduce on the first (no_sync) and
    # averages the accumulated gradient on the second, so the ranks must still hold identical weights
    out = tmp_path / "runs"
    run_two_nodes(distill_args(bank, out, "accum", "distill.accum_steps=2"), tmp_path, "accum")
    weights = rank_weights(tmp_path, "accum")
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    state = torch.load(out / "accum" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    rows = (out / "accum" / "rows" / "rank0.txt").read_text().splitlines()
    assert [len(line.split()) for line in rows] == [4, 4, 4, 4]  # the loader batch is the rank's whole batch


@pytest.mark.slow  # three pairs of fresh Python processes importing torch + timm
def test_two_node_distill_covers_each_epoch_agrees_and_resumes(bank: Path, tmp_path: Path) -> None:
    from test_distill_train import DRAWS, FLIPS, NUM_IMAGES

    out = tmp_path / "runs"
    # 1. uninterrupted: 4 steps on two nodes
    run_two_nodes(distill_args(bank, out, "straight"), tmp_path, "straight")
    # 2. the same run stopped at step 2 and resumed on two nodes
    run_two_nodes(distill_args(bank, out, "resumed", "distill.stop_at_step=2"), tmp_path, "part1")
    run_two_nodes([*distill_args(bank, out, "resumed"), "--resume"], tmp_path, "part2")

    for exp in ("straight", "resumed"):
        # every epoch: the ranks' images are disjoint and together every image once (rows -> image = row // 4)
        steps = [
            [
                [int(r) for r in line.split()]
                for line in (out / exp / "rows" / f"rank{k}.txt").read_text().splitlines()
            ]
            for k in range(2)
        ]
        assert [len(s) for s in steps] == [4, 4], exp
        for epoch in range(2):
            seen = [
                {r // (DRAWS * FLIPS) for step in s[2 * epoch : 2 * epoch + 2] for r in step} for s in steps
            ]
            assert not seen[0] & seen[1], (exp, epoch)
            assert seen[0] | seen[1] == set(range(NUM_IMAGES)), (exp, epoch)
            assert sum(len(step) for s in steps for step in s[2 * epoch : 2 * epoch + 2]) == NUM_IMAGES

    # 3. the ranks hold the same parameters, and the checkpoint holds them
    straight = rank_weights(tmp_path, "straight")
    assert straight[0].keys() == straight[1].keys() and len(straight[0]) > 10
    for key in straight[0]:
        assert torch.equal(straight[0][key], straight[1][key]), key
    model = torch.load(out / "straight" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in straight[0].items():
        assert torch.equal(model[key], value), key
    # 4. stop + resume on two nodes = uninterrupted: the same rows and the same weights
    assert (out / "resumed" / "rows" / "rank0.txt").read_text() == (
        out / "straight" / "rows" / "rank0.txt"
    ).read_text()
    resumed = rank_weights(tmp_path, "part2")
    for key, value in straight[0].items():
        assert torch.equal(resumed[0][key], value), key
        assert torch.equal(resumed[1][key], value), key
    assert (out / "resumed" / "backbone.safetensors").is_file()


SEG = [
    "finetune.backbone=resnet18",
    "finetune.batch_size=4",
    "finetune.num_workers=0",
    "finetune.log_every=1",
    "finetune.device=cpu",
    "finetune.segmentation.iters=4",
    "finetune.checkpoint_every=2",
    "finetune.segmentation.aug.crop_size=32",
    "finetune.segmentation.aug.scale=[64,48]",
    "finetune.segmentation.head.channels=16",
    "finetune.segmentation.head.aux_channels=8",
    "finetune.segmentation.optim.warmup_iters=1",
    "finetune.segmentation.optim.lr=0.001",
    "finetune.vis_samples=2",
    # finetune's default norm (`sync`) on CPU: plain per-rank batch norm (SyncBatchNorm has no CPU kernel)
]


@pytest.mark.slow  # two pairs of fresh Python processes importing torch + timm
def test_two_node_finetune_covers_each_epoch_agrees_and_resumes(tmp_path: Path) -> None:
    from finetune_data import write_ade20k

    root = write_ade20k(tmp_path / "ade", n_train=8, n_val=2)

    def args(exp: str) -> list[str]:
        return [
            "finetune", "--config", str(REPO / "pipeline.yaml"), f"datasets.tiny.root={root}",
            "datasets.tiny.layout=ade20k", "finetune.data=tiny", f"finetune.exp={exp}",
            f"finetune.out={tmp_path / 'runs'}", *SEG,
        ]  # fmt: skip

    # 1. 4 steps on two nodes (global batch 4, 8 images: 2 epochs of 2 steps); rank 0 keeps a copy of its step-2
    #    checkpoint as run "b" (a run that died after step 2), which then resumes on two nodes
    os.environ[COPY_ENV] = str(tmp_path / "runs" / "b" / "checkpoint.pt")
    try:
        run_two_nodes(args("a"), tmp_path, "ft-a")
    finally:
        del os.environ[COPY_ENV]
    run_two_nodes([*args("b"), "--resume"], tmp_path, "ft-b")

    # every epoch gives each training image to exactly one rank
    steps = [
        [
            [int(i) for i in line.split()]
            for line in (tmp_path / "weights-ft-a" / f"batches{k}.txt").read_text().splitlines()
        ]
        for k in range(2)
    ]
    assert [len(s) for s in steps] == [4, 4]
    for epoch in range(2):
        seen = [[i for step in s[2 * epoch : 2 * epoch + 2] for i in step] for s in steps]
        assert sorted(seen[0] + seen[1]) == list(range(8)), epoch
    # the ranks hold the same parameters, the checkpoint holds them, and the resumed run ends on them
    a, b = rank_weights(tmp_path, "ft-a"), rank_weights(tmp_path, "ft-b")
    model = torch.load(tmp_path / "runs" / "a" / "checkpoint.pt", weights_only=True)["model"]
    assert len(a[0]) > 10
    for key, value in a[0].items():
        assert torch.equal(a[1][key], value), key
        assert torch.equal(model[key], value), key
        assert torch.equal(b[0][key], value) and torch.equal(b[1][key], value), key
    assert (tmp_path / "runs" / "b" / "results.json").is_file()


def _launch() -> None:
    """torchrun's entry: the ``dreamteacher`` CLI, recording each rank's live parameters before the group ends.

    ``Runtime.wrap`` is where every stage hands its model to DDP; ``teardown_runtime`` is where it leaves the
    process group. Both are wrapped here (test instrumentation only), so each rank saves what it really holds.
    """
    import distill.train
    import training.runtime as runtime_module

    models: list[torch.nn.Module] = []
    wrap, teardown = runtime_module.Runtime.wrap, runtime_module.teardown_runtime

    def recording_wrap(self, model: torch.nn.Module) -> torch.nn.Module:  # noqa: ANN001 - Runtime
        models.append(model)
        return wrap(self, model)

    def saving_teardown(runtime) -> None:  # noqa: ANN001 - Runtime
        folder = Path(os.environ[WEIGHTS_ENV])
        folder.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in models[-1].named_parameters()}
        torch.save(params, folder / f"rank{runtime.rank}.pt")
        teardown(runtime)

    runtime_module.Runtime.wrap = recording_wrap
    distill.train.teardown_runtime = saving_teardown
    if sys.argv[1:2] == ["finetune"]:
        _instrument_finetune(saving_teardown)

    from dreamteacher.cli import main

    main(sys.argv[1:], prog_name="dreamteacher")


def _instrument_finetune(saving_teardown) -> None:  # noqa: ANN001 - the teardown wrapper above
    """finetune: record each rank's batches (its sampler) and keep rank 0's step-2 checkpoint where COPY_ENV says."""
    import shutil

    import finetune.engine
    import finetune.run
    import finetune.segmentation
    from training.sampler import StepBatchSampler

    folder = Path(os.environ[WEIGHTS_ENV])

    class RecordingSampler(StepBatchSampler):
        def __iter__(self):  # noqa: ANN204 - the sampler's own iterator
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"batches{self.rank}.txt").open("a") as out:
                for batch in super().__iter__():
                    out.write(" ".join(str(b[0] if isinstance(b, tuple) else b) for b in batch) + "\n")
                    out.flush()
                    yield batch

    save = finetune.engine.save_checkpoint

    def save_and_copy(path, state) -> None:  # noqa: ANN001 - the engine's arguments
        save(path, state)
        if state["step"] == 2 and os.environ.get(COPY_ENV):
            Path(os.environ[COPY_ENV]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, os.environ[COPY_ENV])

    finetune.segmentation.StepBatchSampler = RecordingSampler
    finetune.engine.save_checkpoint = save_and_copy
    finetune.run.teardown_runtime = saving_teardown


if __name__ == "__main__":
    _launch()
