"""Encode stage config (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class SlurmConfig:
    """``dreamteacher encode --slurm N``: N SLURM jobs, each one dask worker (dask-jobqueue ``SLURMCluster``).

    One job = one worker process = ``gpus`` GPU(s) (0: a CPU job), so a worker's ``CUDA_VISIBLE_DEVICES`` is the
    one SLURM gives the job. The worker runs ``encode.tasks_per_worker`` task threads and ``encode.num_workers``
    decoding processes: ``cpus`` should cover both. dask-jobqueue's own config (``~/.config/dask/jobqueue.yaml``)
    still applies to anything not set here.
    """

    queue: str = ""
    """Partition (``#SBATCH -p``); empty = the cluster's default."""
    account: str = ""
    """``#SBATCH -A``; empty = none."""
    gpus: int = 1
    """GPUs per job (``#SBATCH --gres=gpu:N``); the worker declares ``--resources GPU=N``. 0 = a CPU-only job."""
    cpus: int = 8
    """``#SBATCH --cpus-per-task``: task threads + decoding processes of the worker."""
    memory: str = "64GB"
    """``#SBATCH --mem`` and the worker's memory limit."""
    walltime: str | int = "24:00:00"
    """``#SBATCH -t``; a job that runs out costs only its in-flight shards (a re-run finishes them). An integer is
    seconds: YAML reads an unquoted ``12:00:00`` as 43200 (base 60), which means the same."""
    python: str = ""
    """The Python the job runs the worker with; empty = the driver's own (a shared-filesystem venv)."""
    prologue: list[str] = field(default_factory=list)
    """Shell lines run before the worker (``module load cuda``, ``source /shared/venv/bin/activate``)."""
    directives: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` options, e.g. ``--constraint=a100``."""
    interface: str = ""
    """Network interface the scheduler and workers listen on (e.g. ``ib0``); empty = the host name's address."""
    log_directory: str = ""
    """Where the jobs' stdout/stderr go; empty = the submit directory."""
    wait_minutes: float = 0.0
    """How long to wait for the first job to start before giving up; 0 = as long as it takes (queued jobs)."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= {low}, got {getattr(self, name)}"
            for name, low in (("gpus", 0), ("cpus", 1), ("wait_minutes", 0))
            if isinstance(getattr(self, name), int | float) and getattr(self, name) < low
        ]
        if problems:
            raise ValueError("\n".join(problems))


@dataclass(kw_only=True)
class EncodeConfig:
    """``dreamteacher encode``: which data, which teacher, how to encode, where the bank goes."""

    data: str = "demo"
    """Name in ``datasets:``."""
    teacher: str = ""
    """Name in ``teachers:``; empty = the dataset's ``teacher``."""
    bank: str = ""
    """Output bank path; empty = ``banks/<data>.zarr``."""
    mode: Literal["noise", "ddim"] = "noise"
    """noise: the paper's stochastic encoding (one UNet pass at T); ddim: deterministic DDIM inversion to T."""
    t: int = 0
    """Noise step T; 0 = the dataset's ``t`` (150 ImageNet, 50 LSUN/FFHQ/BDD in the paper)."""
    ddim_steps: int = 10
    """DDIM inversion steps from 0 to T (mode=ddim)."""
    draws: int = 2
    """Stochastic draws K per image and flip view: each a bank row (``store: draws``) or averaged into one."""
    store: Literal["draws", "mean"] = "draws"
    """draws: one row per draw. mean: one row per (image, flip) holding the mean of the K draws, the MSE
    optimum's unbiased estimate in 1/K of the space (docs/cache-cost.md measures what it is worth)."""
    flips: Literal["none", "both", "mirror"] = "both"
    """both: also store the mirrored image's features (the paper's only augmentation). mirror: store the
    unflipped view only and read the flipped one as its mirror (half the space; as good as the teacher is
    flip-equivariant: ``dreamteacher teacher diagnose``). none: no flipped view."""
    seed: int = 0
    """Global seed; a row's noise seed is derived from (seed, image key, draw)."""
    resolution: int = 0
    """Input size; 0 = the teacher's native resolution."""
    batch_size: int = 32
    """Rows (views) per teacher forward, rounded down to whole images (each image gives draws x flip views)."""
    num_workers: int = 4
    """Decoding processes per encode worker process (started once, shared by its shard tasks)."""
    prefetch_factor: int = 2
    """Batches each decoding process decodes ahead of the teacher."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N. Under dask each worker sees its own GPU as cuda:0."""
    workers: int = 0
    """Workers of the built-in local dask cluster; 0 = one per visible GPU (one on a CPU-only machine)."""
    tasks_per_worker: int = 2
    """Shard tasks in flight per worker: one runs the teacher while the other decodes its images and writes its
    shard, so the accelerator does not wait on I/O. Under an external cluster a task asks for GPU=1/this."""
    retries: int = 2
    """dask retries of a failed shard task (safe: a shard is rewritten whole and marked done last)."""
    cpu_threads: int = 0
    """torch threads of a worker running on CPU; 0 = torch's default. Fix it to get the same bytes from
    processes with different default thread counts."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The SLURM jobs ``--slurm N`` submits."""

    def __post_init__(self) -> None:
        # Ranges the stages divide or loop by (draws=0 was a ZeroDivisionError deep in the run). One problem per line,
        # each starting with the field name: the config loader reports each as `encode.<field> ...`.
        minimums = {
            "draws": 1,
            "ddim_steps": 1,
            "batch_size": 1,
            "prefetch_factor": 1,
            "tasks_per_worker": 1,
            "t": 0,
            "resolution": 0,
            "num_workers": 0,
            "workers": 0,
            "retries": 0,
            "cpu_threads": 0,
        }
        notes = {
            "t": " (0 = the dataset's t)",
            "resolution": " (0 = the teacher's)",
            "workers": " (0 = one per GPU)",
        }
        problems = [
            f"{name} must be >= {low}{notes.get(name, '')}, got {getattr(self, name)}"
            for name, low in minimums.items()
            if isinstance(getattr(self, name), int) and getattr(self, name) < low
        ]
        if problems:
            raise ValueError("\n".join(problems))
