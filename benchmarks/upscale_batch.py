"""Batch upscaling throughput: the Ray Data pipeline (``oftsr upscale --engine ray``: fetch + decode tasks, the
student in an actor pool, encode + write tasks) against the one-process engine (``--engine local``) on the same
images, in one run: 64x64 crops of the sample photos -> 256x256 PNGs with a ``tiny`` student at t = 0.5.

Run: ``.venv/bin/python benchmarks/upscale_batch.py`` (a few minutes on 2 cores; local Ray, SQLite MLflow in a
temporary folder). Writes ``benchmarks/results/upscale_batch.json`` with the machine:
``images_per_s_per_core`` (the Ray pipeline's wall-clock images/s over the machine's cores) and
``speedup_over_one_process`` (Ray pipeline images/s over the one-process engine's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402
from PIL import Image  # noqa: E402

from oftsr.samples import export_sample_photos  # noqa: E402
from pipelines.batch_upscale import UpscaleJob, run  # noqa: E402
from tests.helpers import perturbed_unet, register_student  # noqa: E402


def crops(folder: Path, out: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in export_sample_photos(folder)]
    out.mkdir(parents=True)
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - 64), rng.integers(0, img.shape[1] - 64)
        Image.fromarray(img[y : y + 64, x : x + 64]).save(out / f"{i:04d}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "upscale_batch.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        uri = register_student(root, perturbed_unet(0.02), crop=64)
        crops(root / "photos", root / "in", args.images)
        model = "models:/oftsr-student@candidate"
        common = dict(sources=(str(root / "in"),), knobs=(0.5,), model=model, tracking_uri=uri)
        results = {}
        for engine in ("local", "ray"):
            started = time.perf_counter()
            report = run(UpscaleJob(dest=str(root / f"out-{engine}"), engine=engine, **common))
            wall = time.perf_counter() - started
            assert report["images_done"] == args.images, report
            results[engine] = {
                "wall_s": round(wall, 2),
                "images_per_s": round(args.images / wall, 3),
                "report_images_per_s": report["images_per_s"],
            }
    cores = os.cpu_count() or 1
    result = {
        "benchmark": "upscale_batch",
        "command": ".venv/bin/python benchmarks/upscale_batch.py",
        "input": f"{args.images} PNG crops 64x64 -> 256x256, tiny preset (one 64x64 tile each), t = 0.5, local files",
        "one_process": results["local"],
        "ray_pipeline": results["ray"],
        "images_per_s_per_core": round(results["ray"]["images_per_s"] / cores, 3),
        "one_process_images_per_s_per_core": round(results["local"]["images_per_s"] / cores, 3),
        "speedup_over_one_process": round(results["ray"]["images_per_s"] / results["local"]["images_per_s"], 3),
        "note": "wall-clock of the whole command from Python (the Ray engine's includes starting the local cluster)",
        "machine": describe(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
