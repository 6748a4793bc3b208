"""Crops per second per CPU core for fetch + decode + crop + flip + degrade (the data plane's map_batches body).

One process, one torch thread: the figure is per core. Sources: PNG sample photos on local disk and on a moto S3
server on 127.0.0.1. Run: ``.venv/bin/python benchmarks/data_throughput.py`` (writes
``benchmarks/results/data_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from machine import describe

from oftsr.samples import export_sample_photos
from pipelines.data.config import DataConfig
from pipelines.data.transforms import TrainTransform


def measure(keys: list[str], cfg: DataConfig, seconds: float) -> dict:
    transform = TrainTransform(cfg)
    batch = {"key": np.array(keys[: cfg.batch_size], dtype=object)}
    transform(batch)  # warm-up
    crops, calls, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = (calls * cfg.batch_size) % len(keys)
        batch = {"key": np.array((keys * 2)[i : i + cfg.batch_size], dtype=object)}
        crops += len(transform(batch)["key"])
        calls += 1
    elapsed = time.perf_counter() - start
    return {"crops": crops, "seconds": round(elapsed, 2), "crops_per_s": round(crops / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(tempfile.mkdtemp())
    local = [str(p) for p in export_sample_photos(work / "photos")]
    results: dict = {
        "machine": describe(),
        "torch_threads": 1,
        "images": len(local),
        "format": "PNG",
        "image_sizes": "300x451 to 872x1000 (sample photos)",
        "runs": [],
    }

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="bench")
    for p in local:
        client.upload_file(p, "bench", f"photos/{Path(p).name}")
    remote = [f"s3://bench/photos/{Path(p).name}" for p in local]

    try:
        for source, keys in (("local", local), ("s3-moto", remote)):
            for crop in (256, 64):
                for per_image in (1, 4):
                    cfg = DataConfig(source="unused", crop=crop, crops_per_image=per_image, batch_size=16, seed=None)
                    r = measure(keys, cfg, args.seconds)
                    r.update(source=source, crop=crop, crops_per_image=per_image)
                    results["runs"].append(r)
                    print(json.dumps(r))
    finally:
        server.stop()

    def pick(source, crop, per_image):
        return next(
            r["crops_per_s"]
            for r in results["runs"]
            if r["source"] == source and r["crop"] == crop and r["crops_per_image"] == per_image
        )

    results["crops_per_s_per_core_256"] = pick("local", 256, 1)
    results["crops_per_s_per_core_64"] = pick("local", 64, 1)
    results["target_crops_per_s_per_core_256"] = 100
    results["command"] = "python benchmarks/data_throughput.py"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"headline: {results['crops_per_s_per_core_256']} crops/s per core at 256x256 (target 100) -> {args.out}")


if __name__ == "__main__":
    main()
