"""The quickstart's knob against its trained range: the quickstart's distillation redone in one process on a finished
quickstart's teacher and trajectory cache, then the held-out evaluation and the knob's verdict
(docs/quickstart.md, "Why CI's run failed (2026-12-03)").

The distillation is the recipe's: 960 images in batches of 16, Adam lr 1e-3 after 64 warm-up images, EMA half-life
120 images, ``L_bound`` weight 3, rows drawn at random from the cache and one grid point per row. Variants
(``--variant``, comma-separated ``key=value``): ``tmax`` (the trained range's end: the grid points at or below it
are used, the knob spans [0.01, tmax]), ``decay`` (``const`` or ``cos``: cosine decay after the warm-up), ``lr``,
``images``. The cache must hold grid points up to ``tmax`` (a quickstart run with the range to 0.8 holds both
0.6 and 0.8).

Run (after ``oftsr run quickstart`` in that folder; about 4 min per run on 2 cores):
``.venv/bin/python benchmarks/knob_range.py --outputs outputs --variant tmax=0.6 --seed 0``. Appends to
``benchmarks/results/knob_range.json`` with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from machine import describe  # noqa: E402

DEFAULTS = {"lr": 1e-3, "images": 960, "decay": "const", "tmax": 0.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs", default="outputs", help="a finished quickstart's outputs folder")
    ap.add_argument("--variant", default="", help="comma-separated key=value among " + ", ".join(DEFAULTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knob_range.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from oftsr.ema import EMA
    from oftsr.evaluation import evaluate as run_eval
    from oftsr.evaluation import knob_tradeoff
    from oftsr.nets import UNet
    from oftsr.training import CachedDistillObjective, OptimConfig, make_optimizer, train_step
    from oftsr.trajectory import sample_inputs
    from pipelines.cache.store import read_manifest, read_rows
    from pipelines.pipeline import held_out_crops
    from pipelines.recipes import QUICKSTART, quickstart
    from pipelines.train.checkpoint import read_checkpoint

    v = dict(DEFAULTS)
    for kv in filter(None, args.variant.split(",")):
        key, value = kv.split("=")
        v[key] = type(DEFAULTS[key])(value)
    out_dir = Path(args.outputs)
    prefix = sorted(glob.glob(str(out_dir / "cache" / "trajectories" / "*")))[-1]
    teacher = sorted(glob.glob(str(out_dir / "ray_results" / "quickstart-teacher" / "checkpoint_0*")))[-1]
    rows, manifest = read_rows(prefix), read_manifest(prefix)
    ckpt = read_checkpoint(teacher)
    net = UNet(ckpt["unet"])
    net.load_state_dict(ckpt["ema"])
    deg = manifest["key"]["degradation"]
    seeds = [r["seed"] for r in rows]
    _, x_lr, x0, _ = sample_inputs(
        torch.stack([r["hr"] for r in rows]),
        seeds,
        sf=deg["sf"],
        kind=deg["kind"],
        sigma_y=deg["sigma_y"],
        sigma_p=manifest["key"]["sigma_p"],
    )
    grid = [float(t) for t in rows[0]["t"]]
    keep = [i for i, t in enumerate(grid) if t <= v["tmax"] + 1e-6]
    if grid[keep[-1]] < v["tmax"] - 1e-6:
        raise SystemExit(f"the cache's grid {grid} does not reach tmax={v['tmax']}")

    objective = CachedDistillObjective(t_min=0.01, t_max=v["tmax"], w_bound=QUICKSTART["distill_w_bound"])
    warmup, batch = 64, 16
    optim = OptimConfig(lr=v["lr"], warmup_images=warmup)
    optimizer = make_optimizer(net.parameters(), optim)
    ema = EMA(net, v["images"] / 8)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    seen, order, began = 0, [], time.perf_counter()
    while seen < v["images"]:
        if len(order) < batch:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        pick = [rng.choice(keep) for _ in idx]
        step = {
            "x_lr": x_lr[idx],
            "x0": x0[idx],
            "t": torch.tensor([grid[p] for p in pick]),
            "u_bar": torch.stack([rows[i]["u_bar"][p] for i, p in zip(idx, pick, strict=True)]).float(),
            "v_bar": torch.stack([rows[i]["v_bar"][p] for i, p in zip(idx, pick, strict=True)]).float(),
            "v_bound": torch.stack([rows[i]["v_bound"] for i in idx]).float(),
        }
        lr = optim.lr * min(1.0, (seen + 1) / warmup)
        if v["decay"] == "cos" and seen >= warmup:
            lr = optim.lr * 0.5 * (1 + math.cos(math.pi * (seen - warmup) / (v["images"] - warmup)))
        train_step(net, optimizer, objective, step, lr=lr, grad_clip=optim.grad_clip)
        seen += batch
        ema.update(net, batch)
    train_s = time.perf_counter() - began

    cfg = quickstart().evaluate
    settings = dataclasses.replace(
        cfg, source=str(out_dir / "sample_photos" / "heldout"), method=dataclasses.replace(cfg.method, t_max=v["tmax"])
    )
    hr, _ = held_out_crops(settings)
    report = run_eval(hr, settings, student=ema.module, progress=False)
    verdict = knob_tradeoff(report)
    student = sorted((r for r in report["rows"] if r["method"] == "student"), key=lambda r: r["t"])
    result = {
        "variant": {**v},
        "seed": args.seed,
        "train_s": round(train_s),
        "holds": verdict["holds"],
        "failed": [c["detail"] for c in verdict["checks"] if not c["ok"]],
        "knobs": [r["t"] for r in student],
        "psnr": [round(r["psnr"], 2) for r in student],
        "st_lpips": [round(r["st_lpips"], 4) for r in student],
    }
    print(json.dumps(result))
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "knob_range", "runs": []}
    doc.update(command=".venv/bin/python benchmarks/knob_range.py --outputs outputs --variant tmax=0.6 --seed 0")
    doc["runs"].append({**result, "machine": describe()})
    path.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
