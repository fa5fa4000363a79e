"""Fan shard tasks out over dask.distributed (or run them in-process) with a progress bar.

* Default: a local cluster of worker processes, one per visible GPU (each sees only its GPU through
  ``CUDA_VISIBLE_DEVICES`` and declares ``resources={"GPU": 1}``), or one worker on a CPU-only machine.
  Each worker runs ``tasks_per_worker`` task threads (one computing, the others decoding / writing).
* ``scheduler="tcp://HOST:PORT"``: an existing cluster (``dask scheduler`` + ``dask worker`` on each GPU node,
  ``dask_cuda.LocalCUDACluster``, ``dask_jobqueue.SLURMCluster``). Workers need the project installed and the
  images and the bank on a shared filesystem. When the cluster's workers declare a ``GPU`` resource, each task
  asks for ``1 / tasks_per_worker`` of one.
* ``use_dask=False``: the same task function on a thread pool in this process (debugging, tests).

One task = one shard; tasks are idempotent, so dask retries and whole re-runs are safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import as_completed as futures_as_completed

from distributed.diagnostics.plugin import WorkerPlugin
from tqdm.auto import tqdm

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
                futures = [pool.submit(encode_shard, task) for task in tasks]
                for future in futures_as_completed(futures):
                    results.append(future.result())
                    update(results[-1])
            return results
        with contextlib.ExitStack() as stack:
            address = scheduler or stack.enter_context(local_cluster(workers, tasks_per_worker))
            results = _run_on_cluster(address, tasks, tasks_per_worker, retries, update)
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
                encode_shard,
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
