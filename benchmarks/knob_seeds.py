"""The quickstart's knob verdict over several seeds of the shipped pipeline (issue #27): how much margin each check
of the verdict has, so that a CI run cannot lose it by a hair unnoticed.

``oftsr run quickstart`` runs once as shipped (seed 0) in a scratch folder; for every further seed the same command
runs again with ``--set distill.seed=S`` and its own distill run and output folder, reusing the teacher and the
trajectory cache (the distillation, its data order and its start noise are what the seed changes; the teacher and
the cache are the shipped recipe's, deterministic from the photos). Each run's ``evaluation.json`` gives the verdict
and its margins:

- ``realism``: ST-LPIPS at t = 0 minus at t = 1 (must be > 0), ``bicubic``: bicubic's minus the student's at t = 1;
- ``fidelity``: PSNR at t = 0 minus at t = 1 (must be > 0);
- ``psnr_headroom``, ``st_lpips_headroom``: the smallest, over neighbouring knob values, of the noise allowance
  minus the rise (negative: the check fails).

    .venv/bin/python benchmarks/knob_seeds.py --seeds 0 1 2    # about 7 min + 5 min per further seed on 2 cores

Writes ``shipped_pipeline`` into ``benchmarks/results/knob_range.json`` (beside the one-process runs of
``benchmarks/knob_range.py``) with the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from machine import describe  # noqa: E402


def margins(report: dict) -> dict:
    from oftsr.evaluation import KNOB_TOLERANCE, _rise_noise, knob_tradeoff

    metric = report["perceptual"]
    curve = sorted((r for r in report["rows"] if r["method"] == "student"), key=lambda r: r["t"])
    bicubic = next(r for r in report["rows"] if r["method"] == "bicubic")
    lo, hi = curve[0], curve[-1]
    out = {
        "holds": knob_tradeoff(report)["holds"],
        "realism": round(lo[metric] - hi[metric], 4),
        "bicubic": round(bicubic[metric] - hi[metric], 4),
        "fidelity": round(lo["psnr"] - hi["psnr"], 3),
        "psnr": [round(r["psnr"], 2) for r in curve],
        metric: [round(r[metric], 4) for r in curve],
    }
    for key in ("psnr", metric):
        room = [_rise_noise(a, b, key, KNOB_TOLERANCE[key]) - (b[key] - a[key]) for a, b in itertools.pairwise(curve)]
        out[f"{key}_headroom"] = round(min(room), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knob_range.json"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a new one under the temp folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="oftsr-knob-seeds-"))
    base = [sys.executable, "-m", "pipelines.cli", "run", "quickstart"]
    runs = []
    for seed in args.seeds:
        sets = [] if seed == 0 else [f"distill.seed={seed}", f"distill.run_name=quickstart-distill-seed{seed}"]
        sets += [f"out=outputs/quickstart-seed{seed}"]
        started = time.perf_counter()
        cmd = [*base, *(a for s in sets for a in ("--set", s))]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"seed {seed}: oftsr run failed:\n{proc.stderr[-3000:]}")
        evaluation = work / "outputs" / f"quickstart-seed{seed}" / "evaluation" / "evaluation.json"
        report = json.loads(evaluation.read_text())
        runs.append({"seed": seed, "wall_s": round(time.perf_counter() - started), **margins(report)})
        print(json.dumps(runs[-1]), flush=True)
    keys = ("realism", "bicubic", "fidelity", "psnr_headroom", "st_lpips_headroom")
    result = {
        "command": "benchmarks/knob_seeds.py --seeds " + " ".join(map(str, args.seeds)),
        "machine": describe(),
        "runs": runs,
        "all_hold": all(r["holds"] for r in runs),
        "smallest": {k: min(r[k] for r in runs if k in r) for k in keys},
    }
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "knob_range", "runs": []}
    doc["shipped_pipeline"] = result
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(result["smallest"]))


if __name__ == "__main__":
    main()
