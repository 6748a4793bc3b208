"""CPU upscaling throughput: the reference path (the network as trained, per-call defaults) against the engine's
CPU path (``oftsr.engine.fast_student``: all cores of the affinity mask, channels-last, SDPA, fused norm) through
the same tiling, on the ``tiny`` preset.

Run: ``.venv/bin/python benchmarks/upscale_cpu.py`` -> ``benchmarks/results/upscale_cpu.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from machine import describe  # noqa: E402

from oftsr.engine import fast_student  # noqa: E402
from oftsr.infer import upscale  # noqa: E402
from oftsr.metrics import psnr  # noqa: E402
from oftsr.nets import build_unet  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def main() -> dict:
    torch.manual_seed(0)
    net = build_unet("tiny").eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lr = torch.rand(1, 3, 128, 128) * 2 - 1  # -> 512x512, 64² tiles with 16 px overlap: 100 tiles
    noise = torch.randn(1, 3, 512, 512)
    kw = dict(sigma_p=0.2, sf=4, tile=64, overlap=16, noise=noise)
    threads_before = torch.get_num_threads()
    ref_s, ref = timed(lambda: upscale(net, lr, 0.5, **kw), 3)
    fast = fast_student(net, "cpu")
    fast_s, out = timed(lambda: upscale(fast, lr, 0.5, **kw), 3)
    result = {
        "machine": describe(),
        "command": ".venv/bin/python benchmarks/upscale_cpu.py",
        "input": "1 x 128x128 LR -> 512x512, tiny preset, 64² tiles, overlap 16, tile batch 16",
        "reference_s_per_image": round(ref_s, 3),
        "engine_s_per_image": round(fast_s, 3),
        "speedup": round(ref_s / fast_s, 3),
        "threads": {"reference": threads_before, "engine": torch.get_num_threads()},
        "psnr_engine_vs_reference_db": round(float(psnr(out.clamp(-1, 1), ref.clamp(-1, 1))), 1),
    }
    out_path = ROOT / "benchmarks" / "results" / "upscale_cpu.json"
    out_path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
