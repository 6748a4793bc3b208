"""Where a stage's first minute goes (issue #27): on ONE running local Ray cluster, in one run,

- ``bare_trainer_s``: a bare ``TorchTrainer`` (2 workers of the quickstart's CPUs, a loop that returns at once), from
  ``fit()`` to the loop's first line: the floor that Ray Train sets;
- ``teacher_s``, ``distill_s``: the quickstart's teacher and (cached) distill stage, from the stage's call to its
  first optimisation step (``stage/startup_s``, which every stage logs to MLflow and prints);
- ``trajectories_s``: the quickstart's trajectory stage, from its call to the first shard's computation;
- ``overhead_s`` = the largest of those three minus ``bare_trainer_s``: what is ours, not Ray's.

Budgets are cut to a few steps (start-up does not depend on them); every other setting is the quickstart's. The
MLflow store is created first, as ``oftsr run`` does before its stages (a new SQLite store's schema takes 3 s).

    .venv/bin/python benchmarks/stage_startup.py            # -> benchmarks/results/stage_startup.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from machine import describe  # noqa: E402


def bare_trainer(storage: str, cpus: float, name: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        return {"at": time.time()}

    called = time.time()
    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    return trainer.fit().return_value["at"] - called


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/stage_startup.json"))
    ap.add_argument("--repeats", type=int, default=2, help="bare trainers (the floor is their smallest)")
    args = ap.parse_args()

    import ray

    from oftsr.samples import export_sample_photos
    from pipelines.cache.stage import run_trajectories
    from pipelines.recipes import pipeline
    from pipelines.tracking import check_reachable
    from pipelines.train.driver import run_stage
    from pipelines.tree import with_overrides

    root = Path(tempfile.mkdtemp(prefix="oftsr-startup-"))
    export_sample_photos(root / "photos")
    sets = {
        "data.source": str(root / "photos"),
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "teacher.storage_path": str(root / "ray"),
        "distill.storage_path": str(root / "ray"),
        "trajectories.out": str(root / "cache"),
        "teacher.total_images": "32",
        "distill.total_images": "32",
        "trajectories.crops_per_image": "2",
    }
    tree = pipeline("quickstart")
    started = time.time()
    ray.init(num_cpus=4, log_to_driver=False, configure_logging=False)
    init_s = time.time() - started
    check_reachable(sets["tracking.tracking_uri"])  # the store exists before the stages, as under `oftsr run`
    quiet = lambda *a, **k: None  # noqa: E731

    configs = with_overrides(tree, sets, "run")  # the quickstart as `oftsr run` resolves it, outputs moved
    teacher = configs.stage("teacher")
    floors = [bare_trainer(str(root / "ray"), teacher.cpus_per_worker, f"bare-{i}") for i in range(args.repeats)]
    t = run_stage(teacher, log=quiet)
    traj = run_trajectories(dataclasses.replace(configs.stage("trajectories"), teacher=t["checkpoint"]), log=quiet)
    d = run_stage(dataclasses.replace(configs.stage("distill"), teacher=t["checkpoint"], cache=traj["uri"]), log=quiet)
    ray.shutdown()

    result = {
        "machine": describe(),
        "command": "benchmarks/stage_startup.py " + " ".join(sys.argv[1:]),
        "ray": ray.__version__,
        "ray_init_s": round(init_s, 2),
        "bare_trainer_runs_s": [round(x, 2) for x in floors],
        "bare_trainer_s": round(min(floors), 2),
        "teacher_s": round(t["startup_s"], 2),
        "trajectories_s": round(traj["startup_s"], 2),
        "distill_s": round(d["startup_s"], 2),
        "settings": {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")},
    }
    result["overhead_s"] = round(max(result[k] for k in ("teacher_s", "trajectories_s", "distill_s")) - min(floors), 2)
    result["target"] = {"overhead_s_at_most": 5.0, "ok": result["overhead_s"] <= 5.0}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
