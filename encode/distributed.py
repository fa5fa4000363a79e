"""Fan shard tasks out over dask.distributed (or run them in-process) with a progress bar.

* Default: a local cluster of worker processes, one per visible GPU (each sees only its GPU through
  ``CUDA_VISIBLE_DEVICES`` and declares ``resources={"GPU": 1}``), or one worker on a CPU-only machine.
  Each worker runs ``tasks_per_worker`` task threads (one computing, the others decoding / writing).
* ``scheduler="tcp://HOST:PORT"``: an existing cluster (``dask scheduler`` + ``dask worker`` on each GPU node,
  ``dask_cuda.LocalCUDACluster``, ``dask_jobqueue.SLURMCluster``). Workers need the project installed and the
  images and the bank on a shared filesystem. When the cluster's workers declare a ``GPU`` resource, each task
  asks for ``1 / tasks_per_worker`` of one.
* ``use_dask=False``: the same task function on a thread pool in this process (debugging, tests).
* :func:`slurm_cluster`: N SLURM jobs (dask-jobqueue, ``pip install -e .[slurm]``) built from ``encode.slurm``;
  ``dreamteacher encode --slurm N`` passes its address as the scheduler.

One task = one shard; tasks are idempotent, so dask retries and whole re-runs are safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import as_completed as futures_as_completed

from distributed.diagnostics.plugin import WorkerPlugin
from tqdm.auto import tqdm

from encode.config import EncodeConfig
from encode.worker import ShardStats, ShardTask, clear_caches, encode_shard


class WorkerCaches(WorkerPlugin):
    """dask worker plugin: a worker that closes shuts its decoding processes down and drops its teacher first.

    A task leaves the process's teacher and decoding pool (``encode.worker``'s caches) behind for the next shard,
    which is the point; but a dask worker process is stopped by its nanny, which kills it after a 4 s grace period
    when it has not exited, and the pool's forkserver, decoding workers and resource tracker then outlived the
    encode (6 processes, about 740 MB per worker). ``teardown`` runs inside ``Worker.close``, before that kill.
    """

    name = "dreamteacher-encode-caches"

    def teardown(self, worker: object) -> None:
        clear_caches()


def run_shard(task: ShardTask) -> ShardStats:
    """:func:`encode.worker.encode_shard`, stamped with the ``host:pid`` that ran it (which worker did what)."""
    stats = encode_shard(task)
    stats.worker = f"{socket.gethostname()}:{os.getpid()}"
    return stats


def shards_per_worker(results: Sequence[ShardStats]) -> dict[str, int]:
    """Shards each process encoded in this run (skipped ones, already done, are not counted)."""
    return dict(sorted(Counter(s.worker for s in results if not s.skipped).items()))


def visible_gpus() -> list[str]:
    """Device ids this process may use (``CUDA_VISIBLE_DEVICES`` entries, or ``0..n-1``)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@contextlib.contextmanager
def local_cluster(workers: int, tasks_per_worker: int) -> Iterator[str]:
    """Start a local dask cluster (one worker process per GPU, or ``workers`` CPU workers); yield its address."""
    import dask
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()
    count = workers or max(1, len(gpus))
    specs = {}
    for i in range(count):
        env: dict[str, str] = {}
        # no memory limit: a worker holds at most tasks_per_worker shards
        options: dict = {
            "nthreads": tasks_per_worker,
            "memory_limit": 0,
            "env": env,
            "silence_logs": logging.WARNING,
        }
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            options["resources"] = {"GPU": 1}
        specs[f"encode-{i}"] = {"cls": Nanny, "options": options}
    # Decoding workers are child processes: a daemonic dask worker may not have children.
    with dask.config.set({"distributed.worker.daemon": False}):
        scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False}}
        with SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.WARNING) as cluster:
            yield cluster.scheduler_address


def _progress(total_shards: int, enabled: bool) -> tuple[tqdm, Callable[[ShardStats], None]]:
    bar = tqdm(total=total_shards, unit="shard", desc="encode", disable=not enabled, dynamic_ncols=True)
    start, done = time.perf_counter(), {"images": 0}

    def update(stats: ShardStats) -> None:
        done["images"] += stats.images
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(images_per_s=f"{done['images'] / elapsed:.1f}", refresh=False)
        bar.update(1)

    return bar, update


def run_tasks(
    tasks: Sequence[ShardTask],
    *,
    use_dask: bool = True,
    scheduler: str | None = None,
    workers: int = 0,
    tasks_per_worker: int = 2,
    retries: int = 2,
    progress: bool = True,
) -> list[ShardStats]:
    """Run every shard task; returns their stats in completion order. Raises the first task error."""
    if not tasks:
        return []
    bar, update = _progress(len(tasks), progress)
    results: list[ShardStats] = []
    with bar:
        if not use_dask:
            with ThreadPoolExecutor(max_workers=tasks_per_worker, thread_name_prefix="encode") as pool:
                futures = [pool.submit(run_shard, task) for task in tasks]
                for future in futures_as_completed(futures):
                    results.append(future.result())
                    update(results[-1])
        else:
            with contextlib.ExitStack() as stack:
                address = scheduler or stack.enter_context(local_cluster(workers, tasks_per_worker))
                results = _run_on_cluster(address, tasks, tasks_per_worker, retries, update)
    if progress:
        counts = shards_per_worker(results)
        print(f"workers        {len(counts)}: " + ", ".join(f"{w} {n} shards" for w, n in counts.items()))
    return results


def _run_on_cluster(
    address: str,
    tasks: Sequence[ShardTask],
    tasks_per_worker: int,
    retries: int,
    update: Callable[[ShardStats], None],
) -> list[ShardStats]:
    from distributed import Client, as_completed

    with Client(address, set_as_default=False) as client:
        client.register_plugin(WorkerCaches(), name=WorkerCaches.name)  # idempotent: replaced per run
        info = client.scheduler_info()
        if not info.get("workers"):
            client.wait_for_workers(1, timeout=120)
            info = client.scheduler_info()
        has_gpu = any("GPU" in w.get("resources", {}) for w in info["workers"].values())
        resources = {"GPU": 1.0 / tasks_per_worker} if has_gpu else None
        token = uuid.uuid4().hex[:8]  # fresh keys: never reuse a previous run's (possibly failed) result
        futures = [
            client.submit(
                run_shard,
                task,
                key=f"encode-shard-{task.shard:06d}-{token}",
                retries=retries,
                resources=resources,
                pure=False,
            )  # fmt: skip
            for task in tasks
        ]
        results = []
        for future in as_completed(futures, loop=client.loop):
            stats = future.result()
            results.append(stats)
            update(stats)
            future.release()
        return results


# ------------------------------------------------------------------------------------------------------------
# SLURM (dask-jobqueue, optional)
# ------------------------------------------------------------------------------------------------------------
def slurm_cluster_options(enc: EncodeConfig) -> dict:
    """``dask_jobqueue.SLURMCluster`` keyword arguments for ``encode.slurm``: one job = one worker process.

    The worker runs ``encode.tasks_per_worker`` threads (``cores``), declares its GPUs as a dask resource (the
    tasks ask for ``1 / tasks_per_worker`` of one) and is non-daemonic so it may start decoding processes.
    """
    slurm = enc.slurm
    directives = [f"--gres=gpu:{slurm.gpus}"] if slurm.gpus else []
    options: dict = {
        "cores": enc.tasks_per_worker,
        "processes": 1,
        "job_cpu": slurm.cpus,
        "memory": slurm.memory,
        "walltime": _walltime(slurm.walltime),
        "job_name": "dreamteacher-encode",
        "python": slurm.python or sys.executable,
        "job_extra_directives": [*directives, *slurm.directives],
        "worker_extra_args": ["--resources", f"GPU={slurm.gpus}"] if slurm.gpus else [],
        "job_script_prologue": [*slurm.prologue, "export DASK_DISTRIBUTED__WORKER__DAEMON=False"],
        "scheduler_options": {"dashboard_address": None},
    }
    for key, value in (
        ("queue", slurm.queue),
        ("account", slurm.account),
        ("interface", slurm.interface),
        ("log_directory", slurm.log_directory),
    ):
        if value:
            options[key] = value
    return options


def _walltime(value: str | int) -> str:
    """SLURM's ``H:MM:SS`` from the config (an int is seconds: YAML's reading of an unquoted ``12:00:00``)."""
    if isinstance(value, str):
        return value
    hours, rest = divmod(int(value), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def make_slurm_cluster(enc: EncodeConfig):  # noqa: ANN201 - dask_jobqueue.SLURMCluster, an optional dependency
    """A ``SLURMCluster`` from ``encode.slurm`` (its scheduler runs in this process); nothing is submitted yet."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise ImportError(
            "--slurm needs dask-jobqueue: pip install -e '.[slurm]' (or pip install dask-jobqueue)"
        ) from exc
    return SLURMCluster(**slurm_cluster_options(enc))


@contextlib.contextmanager
def slurm_cluster(enc: EncodeConfig, jobs: int) -> Iterator[str]:
    """Submit ``jobs`` SLURM jobs, wait for the first worker (``encode.slurm.wait_minutes``), yield the address.

    The jobs are cancelled when the block ends (the scheduler lives in this process: keep it running).
    """
    from distributed import Client

    if jobs < 1:
        raise ValueError(f"--slurm must be >= 1 job, got {jobs}")
    with make_slurm_cluster(enc) as cluster:
        cluster.scale(jobs=jobs)
        wait = enc.slurm.wait_minutes * 60 or None
        print(
            f"encode: submitted {jobs} SLURM job(s); waiting for the first worker at {cluster.scheduler_address}"
        )
        with Client(cluster, set_as_default=False) as client:
            try:
                client.wait_for_workers(1, timeout=wait)
            except TimeoutError as exc:
                raise TimeoutError(
                    f"no SLURM job started within encode.slurm.wait_minutes={enc.slurm.wait_minutes}; "
                    "see squeue and the jobs' logs (encode.slurm.log_directory)"
                ) from exc
        yield cluster.scheduler_address
