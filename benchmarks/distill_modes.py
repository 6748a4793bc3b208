"""Online vs cached distillation (DESIGN section 5): time per step on the same batch, cache bytes per sample, and
the quality of both students trained for the same number of steps from the same teacher.

Run: ``.venv/bin/python benchmarks/distill_modes.py`` (CPU, ``tiny`` preset, 64² crops of the sample photos;
about 10 minutes on 2 cores). Writes ``benchmarks/results/distill_modes.json``. The teacher is trained in-process
(``--teacher-steps``) unless ``--teacher PATH`` gives weights (safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from machine import describe

from oftsr.augment import apply_box, random_box
from oftsr.flow import conditioned
from oftsr.infer import one_step
from oftsr.metrics import psnr
from oftsr.nets import build_unet, load_weights
from oftsr.training import CachedDistillObjective, OptimConfig, distill_step, make_optimizer, train_step
from oftsr.trajectory import sample_inputs, teacher_targets
from pipelines.cache.config import DEFAULT_GRID
from pipelines.cache.store import SCHEMA, tensor_bytes, write_shard
from pipelines.local_teacher import LocalTeacherConfig, _load_rgb
from pipelines.local_teacher import run as train_local_teacher

SIGMA_P = 0.2


def crops(paths, n, seed, crop=64):
    g = torch.Generator().manual_seed(seed)
    images = [_load_rgb(p) for p in paths]
    out = []
    for i in range(n):
        im = images[i % len(images)]
        out.append(apply_box(im, random_box(im.shape[1], im.shape[2], crop, generator=g)))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--train-crops", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150, help="distillation steps per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_modes.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())

    if args.teacher is None:
        train_local_teacher(
            LocalTeacherConfig(
                out_dir=str(work / "teacher"), photos_dir=str(work / "photos"), steps=args.teacher_steps
            ),
            log=lambda *_: None,
        )
        args.teacher = str(work / "teacher" / "ema.safetensors")
        photos = sorted((work / "photos").glob("*.png"))
    else:
        from oftsr.samples import export_sample_photos

        photos = export_sample_photos(work / "photos")
    teacher = load_weights(build_unet("tiny"), args.teacher).eval().requires_grad_(False)
    held_names = ("chelsea", "flower")
    train_paths = [p for p in photos if p.stem not in held_names]
    held_paths = [p for p in photos if p.stem in held_names]

    # The cache: every training crop, one seed, the default 21-point grid, fp16.
    hr_u8 = crops(train_paths, args.train_crops, seed=1)
    seeds = list(range(1000, 1000 + len(hr_u8)))
    _, x_lr_all, x0_all, _ = sample_inputs(hr_u8, seeds, sf=4, kind="bicubic", sigma_y=0.0, sigma_p=SIGMA_P)
    start = time.perf_counter()
    cache = {"u_bar": [], "v_bar": [], "v_bound": [], "endpoint": []}
    rows = []
    for i in range(0, len(hr_u8), args.batch):
        out = teacher_targets(teacher, x_lr_all[i : i + args.batch], x0_all[i : i + args.batch], DEFAULT_GRID)
        for k in cache:
            cache[k].append(out[k].half())
        for j in range(out["endpoint"].shape[0]):
            rows.append(
                {
                    "key": "k",
                    "box": [0] * 6,
                    "crop_index": 0,
                    "seed": seeds[i + j],
                    "t": list(DEFAULT_GRID),
                    "hr": tensor_bytes(hr_u8[i + j], "uint8"),
                    "u_bar": tensor_bytes(out["u_bar"][:, j], "float16"),
                    "v_bar": tensor_bytes(out["v_bar"][:, j], "float16"),
                    "v_bound": tensor_bytes(out["v_bound"][j], "float16"),
                    "endpoint": tensor_bytes(out["endpoint"][j], "float16"),
                    "nfe": out["nfe"],
                }
            )
    cache_seconds = time.perf_counter() - start
    u_bar = torch.cat(cache["u_bar"], dim=1)  # (K, N, 3, H, W)
    v_bar = torch.cat(cache["v_bar"], dim=1)
    v_bound = torch.cat(cache["v_bound"])
    _, size = write_shard(str(work / "cache"), 0, rows)
    assert SCHEMA.names[0] == "key"

    def student():
        net = build_unet("tiny")
        net.load_state_dict(teacher.state_dict())
        return net.train().requires_grad_(True)

    def batch_ids(step):
        g = torch.Generator().manual_seed(step)
        return torch.randint(len(hr_u8), (args.batch,), generator=g)

    results = {}
    for mode in ("online", "cached"):
        torch.manual_seed(0)
        net = student()
        opt = make_optimizer(net.parameters(), OptimConfig(lr=args.lr, warmup_images=0))
        gen = torch.Generator().manual_seed(0)
        times = []
        for step in range(args.steps):
            ids = batch_ids(step)
            t0 = time.perf_counter()
            if mode == "online":
                distill_step(net, teacher, opt, x_lr_all[ids], sigma_p=SIGMA_P, lr=args.lr, generator=gen)
            else:
                k = torch.randint(len(DEFAULT_GRID), (args.batch,), generator=gen)
                batch = {
                    "x_lr": x_lr_all[ids],
                    "x0": x0_all[ids],
                    "t": torch.tensor(DEFAULT_GRID)[k],
                    "u_bar": u_bar[k, ids].float(),
                    "v_bar": v_bar[k, ids].float(),
                    "v_bound": v_bound[ids].float(),
                }
                train_step(net, opt, CachedDistillObjective(), batch, lr=args.lr)
            times.append(time.perf_counter() - t0)
        results[mode] = {"net": net.eval(), "step_s": sorted(times[5:])[len(times[5:]) // 2]}

    # Held-out quality: PSNR to HR at t = 0.01, distance to the teacher's own endpoint at t = 0.99.
    held_u8 = crops(held_paths, 16, seed=7)
    hr, x_lr, x0, _ = sample_inputs(held_u8, list(range(16)), sf=4, kind="bicubic", sigma_y=0.0, sigma_p=SIGMA_P)
    teacher_end = teacher_targets(teacher, x_lr, x0, (0.99,), steps_per_interval=20)["endpoint"]
    report = {
        "machine": describe(),
        "preset": "tiny",
        "crop": 64,
        "batch": args.batch,
        "steps": args.steps,
        "train_crops": len(hr_u8),
        "teacher": "trained in-process" if work in Path(args.teacher).parents else args.teacher,
        "grid_points": len(DEFAULT_GRID),
        "cache_bytes_per_sample": round(size / len(rows)),
        "cache_build_seconds": round(cache_seconds, 1),
        "command": "python benchmarks/distill_modes.py " + " ".join(sys.argv[1:]),
    }
    with torch.no_grad():
        report["teacher_psnr_endpoint"] = round(psnr(teacher_end, hr).mean().item(), 3)
        for mode in ("online", "cached"):
            v = conditioned(results[mode]["net"], x_lr)
            report[mode] = {
                "step_seconds_median": round(results[mode]["step_s"], 4),
                "psnr_t0.01": round(psnr(one_step(v, x0, 0.01), hr).mean().item(), 3),
                "mse_to_teacher_endpoint_t0.99": round((one_step(v, x0, 0.99) - teacher_end).square().mean().item(), 6),
            }
    report["speedup_cached_over_online"] = round(results["online"]["step_s"] / results["cached"]["step_s"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
