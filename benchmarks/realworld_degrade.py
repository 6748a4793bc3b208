"""Real-world (Real-ESRGAN chain) degradation throughput, in one run:

* ``crops_per_s_per_core_256``: the data path (``data.degrade_on=data``): a Ray Data CPU task's work per 256x256
  crop on one thread: the chain alone (``chain``), and the whole transform (decode the photo, cut the region,
  degrade: ``transform``), with the published Real-ESRGAN settings and with the official OFTSR ones (300-pixel
  regions degraded, then the paired 256 crop).
* ``worker.crops_per_s``: the worker path (``data.degrade_on=worker``): :func:`pipelines.data.transforms.
  degrade_on_worker` on batches of 16 regions on this machine's device with all its threads.
* ``cores_per_gpu_for_ffhq_teacher``: how many CPU cores the data path needs to feed the ``ffhq`` teacher's ~100
  training images/s on one H200 (DESIGN section 10).

Run: ``.venv/bin/python benchmarks/realworld_degrade.py`` (about a minute). Writes
``benchmarks/results/realworld_degrade.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402

from oftsr.realesrgan import OFTSR_REALSR, RealESRGANSettings, realesrgan  # noqa: E402
from oftsr.samples import export_sample_photos  # noqa: E402
from pipelines.data.config import DataConfig  # noqa: E402
from pipelines.data.transforms import TrainTransform, degrade_on_worker  # noqa: E402

TEACHER_IMAGES_PER_S = 100.0  # the ffhq teacher's training rate on one H200 (DESIGN section 10, bf16 batch 16)


def _rate(fn, n: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return n / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crops", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "realworld_degrade.json"))
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    out: dict = {"benchmark": "realworld_degrade", "command": ".venv/bin/python benchmarks/realworld_degrade.py"}
    with tempfile.TemporaryDirectory() as tmp:
        photos = export_sample_photos(Path(tmp) / "photos")
        keys = [str(p) for p in photos]
        settings = {"published": RealESRGANSettings(), "oftsr_official": OFTSR_REALSR}
        torch.set_num_threads(1)  # one Ray Data task = one core
        per_core = {}
        for name, s in settings.items():
            region = s.crop_pad_size or 256
            x = (torch.randint(0, 256, (1, 3, region, region)).float() / 127.5 - 1).expand(args.crops, -1, -1, -1)
            rng = np.random.default_rng(0)
            batch = {"key": np.array([keys[i % len(keys)] for i in range(args.crops)], dtype=object)}
            data = DataConfig(source=tmp, crop=256, degradation="realesrgan", realesrgan=s, seed=0, batch_size=16)
            transform = TrainTransform(data)
            seeds = [int(v) for v in rng.integers(0, 2**62, args.crops)]
            chain = _rate(lambda x=x, s=s, seeds=seeds: realesrgan(x, seeds, 4, s), args.crops)
            produced = len(transform(batch)["key"])  # photos smaller than the region are skipped, not counted
            whole = _rate(lambda t=transform, b=batch: t(b), produced)
            per_core[name] = {
                "region": region,
                "chain_crops_per_s": round(chain, 2),
                "transform_crops_per_s": round(whole, 2),
            }
        torch.set_num_threads(threads)
        worker_cfg = DataConfig(
            source=tmp, crop=256, degradation="realesrgan", degrade_on="worker", realesrgan=RealESRGANSettings()
        )
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        regions = (torch.randint(0, 256, (16, 3, 256, 256)).float() / 127.5 - 1).to(device)
        seeds = torch.arange(16, dtype=torch.int64)

        def worker_batches(n_batches: int = max(1, args.crops // 16)) -> None:
            for b in range(n_batches):
                degrade_on_worker(worker_cfg, {"hr": regions, "seed": seeds + 16 * b})
            if device.type == "cuda":
                torch.cuda.synchronize()

        worker = _rate(worker_batches, 16 * max(1, args.crops // 16))
    published = per_core["published"]["chain_crops_per_s"]
    out.update(
        {
            "crops_per_s_per_core_256": published,
            "target_crops_per_s_per_core_256": 25,
            "per_core": per_core,
            "cores_per_gpu_for_ffhq_teacher": round(TEACHER_IMAGES_PER_S / published, 1),
            "cores_per_gpu_for_ffhq_teacher_with_decode": round(
                TEACHER_IMAGES_PER_S / per_core["published"]["transform_crops_per_s"], 1
            ),
            "worker": {
                "device": str(device),
                "threads": threads,
                "batch": 16,
                "crops_per_s": round(worker, 2),
                "crops_per_s_per_thread": round(worker / threads, 2) if device.type == "cpu" else None,
            },
            "note": (
                "best of 3 passes after a warm-up, one thread; crops_per_s_per_core_256 is the degradation of a "
                "256x256 crop with the published settings (chain); transform adds decoding a whole sample photo "
                "(up to 512x512 PNG) per crop and cutting the region, which crops_per_image > 1 amortises; the "
                "official OFTSR settings degrade a 300x300 region per 256 crop"
            ),
            "machine": describe(),
        }
    )
    out["machine"]["torch_threads"] = threads
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
