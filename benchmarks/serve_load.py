"""The service under bounded load: requests/s and latency percentiles of ``POST /upscale`` at 1 and 8 concurrent
clients, against a Ray Serve application on a local Ray cluster on 127.0.0.1 only (one replica, a ``tiny`` student,
64x64 PNG inputs -> 256x256).

Run: ``.venv/bin/python benchmarks/serve_load.py`` (a few minutes on 2 cores). Writes
``benchmarks/results/serve_load.json`` with the machine: ``c1.requests_per_s``, ``c8.requests_per_s``,
``c8.p99_ms`` and more.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402
from PIL import Image  # noqa: E402

from tests.helpers import perturbed_unet, register_student  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=300) as resp:
        resp.read()
        assert resp.status == 200
    return time.perf_counter() - started


def load(url: str, bodies: list[bytes], clients: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(bodies),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(bodies) / wall, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args(argv)
    import ray
    from ray import serve

    from pipelines.serve import build_app

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(args.requests):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        uri = register_student(tmp, perturbed_unet(0.02), crop=64)
        ray.init(address="local", log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app("models:/oftsr-student@champion", uri, cpus_per_replica=1.0)
        serve.run(app, name="oftsr", route_prefix="/")
        url = f"http://127.0.0.1:{port}/upscale?t=0.5"
        for b in bodies[:4]:  # warm-up
            post(url, b)
        c1 = load(url, bodies, 1)
        c8 = load(url, bodies, 8)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as resp:
            health = json.loads(resp.read())
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_load",
        "command": ".venv/bin/python benchmarks/serve_load.py",
        "setup": "one replica (1 CPU), max batch 8, tiny preset, 64x64 PNG -> 256x256, t = 0.5, clients on 127.0.0.1",
        "c1": c1,
        "c8": c8,
        "model_calls_per_request": round(health["model_calls"] / max(health["requests"], 1), 3),
        "machine": describe(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
