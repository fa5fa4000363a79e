"""Does mix distillation help on the demo? Feature-distilled vs mix-distilled students over several distill seeds.

``make study-mix`` (about 16 minutes on 2 CPU cores for 5 seeds after ``make demo``). The demo distils one
student per init and varies only the fine-tuning seed, so its paired std leaves out the distill run's own
variance (docs/demo.md: the float order of one distill run moved the distilled column by 1.6 mIoU). Here a seed
``s`` fixes both the distill run (``distill.seed``: student init, data order) and the few-label fine-tuning run
(``finetune.seed``) of every init, with the demo's full recipe, bank and interpreter: the distilled and the
mix-distilled student of seed ``s`` differ only in the soft-label term, and ``mix - distilled`` per seed is the
paired effect with every source of run-to-run variance inside it.

Seed 0 is the demo's own runs (the same configs), reused when ``make demo`` has made them. Finished runs are read
back on a re-run. Output: the table on stdout and ``<demo.out>/study-mix/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the project's packages come from this checkout

from configlib import atomic_write_text  # noqa: E402
from dreamteacher.demo import (  # noqa: E402
    derive,
    distill_job,
    finetune_all,
    format_table,
    plan_demo,
    side_by_side,
    summarise,
)
from dreamteacher.resolve import resolve  # noqa: E402
from dreamteacher.schema import PipelineConfig, load_pipeline  # noqa: E402

TASK = "fewshot"
INITS = ("distilled", "mix", "random")


def plan_runs(cfg: PipelineConfig, seeds: list[int]) -> tuple[dict, dict]:
    """(distill configs by (init, seed), fine-tune configs by (task, init, seed)); seed 0 = the demo's runs."""
    plan = plan_demo(cfg, "full")
    base_distill = {"distilled": plan.distill, "mix": plan.mix_distill}
    distills, finetunes = {}, {}
    for seed in seeds:
        for init in INITS:
            ft = plan.finetune.get((TASK, init, 0))
            if init == "random":
                exp = ft.finetune.exp if seed == 0 else f"{ft.finetune.exp[: -len('seed0')]}seed{seed}"
                finetunes[(TASK, init, seed)] = derive(ft, [f"finetune.seed={seed}", f"finetune.exp={exp}"])
                continue
            dist = base_distill[init]
            if seed == 0:
                backbone = plan.backbones[init]
            else:
                exp = f"{dist.distill.exp}-dseed{seed}"
                dist = derive(dist, [f"distill.seed={seed}", f"distill.exp={exp}"])
                backbone = Path(dist.distill.out) / exp / "backbone.safetensors"
            if not backbone.is_file():
                distills[(init, seed)] = dist
            name = ft.finetune.exp if seed == 0 else f"full-{TASK}-{init}-dseed{seed}-seed{seed}"
            finetunes[(TASK, init, seed)] = derive(
                ft, [f"finetune.ckpt={backbone}", f"finetune.seed={seed}", f"finetune.exp={name}"]
            )
    return distills, finetunes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "pipeline.yaml"))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (distill and fine-tuning)")
    args = parser.parse_args()
    started = time.perf_counter()
    cfg = load_pipeline(args.config)
    seeds = list(range(args.seeds))

    # 1. the demo's bank and soft labels (encode and interpret resume / are no-ops when `make demo` made them)
    from encode.pipeline import run_encode
    from interpret.run import run_interpret

    plan = plan_demo(cfg, "full")
    run_encode(resolve(plan.encode, "encode"), use_dask=False, progress=True)
    interpreter = run_interpret(resolve(plan.interpret, "interpret"), progress=True)

    # 2. the distill runs of every (init, seed) not yet exported, side by side
    distills, finetunes = plan_runs(cfg, seeds)
    tick = time.perf_counter()
    side_by_side(distill_job, distills, cfg.demo, plan.distill.distill.device, desc="study-mix: distill")
    distill_s = time.perf_counter() - tick

    # 3. few-label fine-tuning of every (init, seed), finished ones read back
    tick = time.perf_counter()
    runs = finetune_all(finetunes, cfg.demo, desc="study-mix: fine-tune")
    finetune_s = time.perf_counter() - tick

    # 4. paired table: a seed fixes the distill run and the fine-tuning run of every init
    rows = [row for row in summarise(runs) if row["task"] == TASK]
    table = format_table(rows, len(seeds))
    per_seed = {f"{i}/{s}": round(float(m["mIoU"]), 2) for (_, i, s), m in sorted(runs.items())}
    results = {
        "seeds": seeds,
        "per_seed_mIoU": per_seed,
        "table": rows,
        "interpreter_mIoU": interpreter["mIoU"],
        "seconds": {"distill": distill_s, "finetune": finetune_s, "total": time.perf_counter() - started},
        "distill_runs_made": len(distills),
        "machine": f"{platform.system()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores",
    }
    out = Path(cfg.demo.out) / "study-mix"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    print(table)
    print("per seed (init/seed: mIoU):", per_seed)
    print(
        f"{results['machine']}; distill {distill_s:.0f} s, fine-tune {finetune_s:.0f} s; {out / 'results.json'}"
    )


if __name__ == "__main__":
    main()
