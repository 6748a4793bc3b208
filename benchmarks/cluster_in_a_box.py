"""The cost of going multi-node: the quickstart on one node (``oftsr run quickstart``, local Ray) beside the same
recipe and budget submitted to a cluster in a box (``oftsr submit quickstart``: a head and two worker nodes in
their own network and mount namespaces, data, checkpoints and caches on S3, runs on an MLflow server;
:mod:`tests.netns_cluster`), one after the other on this machine.

Run (as root, from the repository root): ``.venv/bin/python benchmarks/cluster_in_a_box.py`` (about 15 minutes
on 2 cores). Writes ``benchmarks/results/cluster_in_a_box.json``: ``single_node_wall_s``, ``multinode_wall_s``,
``worker_nodes_used``, each run's time breakdown, and the machine. The box runs on the same cores as the single node
(its nodes are namespaces, not machines): the difference is the price of the distributed path (S3 for every
checkpoint and cache, an MLflow server over HTTP, Ray's object transfers between nodes, spreading the workers), not
a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe  # noqa: E402

from tests.helpers import quickstart_command  # noqa: E402
from tests.netns_cluster import BUCKET, NetnsCluster  # noqa: E402
from tests.pipelines.test_multinode import quickstart_sets  # noqa: E402


def _time_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("time: ")]
    return lines[-1] if lines else ""


def single_node(folder: Path) -> dict:
    cmd = quickstart_command(folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))}
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
    wall = time.perf_counter() - started
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    summary = json.loads((folder / "out" / "summary.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "time_s": summary["time_s"],
        "time_line": _time_line(out.stdout),
        "console": out.stdout.splitlines(),
    }


def multinode(folder: Path) -> dict:
    import boto3

    from oftsr.samples import export_sample_split
    from pipelines.tracking import client

    with NetnsCluster(folder / "box", workers=2, cpus_per_worker=2) as box:
        env = box.aws_env
        s3 = boto3.client(
            "s3",
            endpoint_url=box.s3_endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        train, heldout = export_sample_split(folder / "photos")
        for split, path in (("train", train), ("heldout", heldout)):
            for f in sorted(path.iterdir()):
                s3.upload_file(str(f), BUCKET, f"photos/{split}/{f.name}")
        cmd = [sys.executable, "-m", "pipelines.cli", "submit", "quickstart", "--address", box.address, "--wait"]
        for s in quickstart_sets(box):
            cmd += ["--set", s]
        started = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=box.client_env)
        wall = time.perf_counter() - started
        if out.returncode:
            raise RuntimeError(out.stdout[-3000:] + out.stderr[-2000:])
        c = client(box.tracking_uri)
        exp = c.get_experiment_by_name("oftsr")
        stages = [  # MLflow's filter has no IN for tags
            r for stage in ("teacher", "distill")
            for r in c.search_runs([exp.experiment_id], filter_string=f"tags.`oftsr.stage` = '{stage}'")
        ]  # fmt: skip
        nodes = sorted({n for r in stages for n in r.data.tags.get("oftsr.worker_nodes", "").split(",") if n})
        (parent,) = c.search_runs([exp.experiment_id], filter_string="tags.`oftsr.stage` = 'pipeline'")
        seconds = {k[5:-2]: v for k, v in parent.data.metrics.items() if k.startswith("time/")}
        return {
            "wall_s": round(wall, 1),
            "time_line": _time_line(out.stdout),
            "time_s": seconds,
            "worker_nodes_used": len(nodes),
            "worker_nodes": nodes,
            "console": out.stdout.splitlines(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster_in_a_box.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="box-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "single").mkdir()
        single = single_node(tmp / "single")
        print(f"single node: {single['wall_s']:.0f} s ({single['time_line']})", flush=True)
        multi = multinode(tmp / "multi")
        print(f"cluster in a box: {multi['wall_s']:.0f} s ({multi['time_line']})", flush=True)
    result = {
        "benchmark": "cluster_in_a_box",
        "command": "python benchmarks/cluster_in_a_box.py",
        "recipe": "quickstart (as shipped; multi-node: data, checkpoints and caches on S3, MLflow server, SPREAD)",
        "single_node_wall_s": single["wall_s"],
        "multinode_wall_s": multi["wall_s"],
        "worker_nodes_used": multi["worker_nodes_used"],
        "multinode_over_single": round(multi["wall_s"] / single["wall_s"], 2),
        "single_node": single,
        "multinode": multi,
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("single_node_wall_s", "multinode_wall_s", "worker_nodes_used")}))


if __name__ == "__main__":
    main()
