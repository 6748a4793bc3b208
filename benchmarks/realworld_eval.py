"""The real-world student against the bicubic-trained one, on held-out crops degraded by the real-world chain
(and, for reference, on clean bicubic inputs); and the README's picture grid of HR crops with draws of their LR.

Prerequisites: ``make quickstart`` (registers ``oftsr-student``) and ``.venv/bin/oftsr run realworld_quickstart``
(registers ``oftsr-realworld-student``), both in this checkout (their SQLite store ``mlflow.db``).
Run: ``.venv/bin/python benchmarks/realworld_eval.py`` (about a minute). Writes
``benchmarks/results/realworld_eval.json`` and ``docs/images/realworld_grid.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from machine import describe  # noqa: E402
from PIL import Image  # noqa: E402

from oftsr.conventions import image_to_uint8  # noqa: E402
from oftsr.evaluation import combine, evaluate_shard  # noqa: E402
from oftsr.nets import UNet  # noqa: E402
from oftsr.realesrgan import realesrgan  # noqa: E402
from pipelines.pipeline import held_out_crops  # noqa: E402
from pipelines.recipes import pipeline  # noqa: E402
from pipelines.registry import load_model, require_kind  # noqa: E402


def _student(uri: str, tracking_uri: str) -> UNet:
    net, meta = load_model(uri, tracking_uri=tracking_uri)
    require_kind(uri, meta, "student", "a student is needed here")
    return net.eval()


def grid(hr: torch.Tensor, settings, draws: int, out: Path) -> None:
    """Rows: an HR crop, then ``draws`` LR draws of it (nearest-neighbour enlarged to the HR size); the held-out
    photos' 192x192 crops (larger than the 64x64 evaluation crops, to be seen)."""
    rows = []
    for i in range(hr.shape[0]):
        lrs = realesrgan(hr[i : i + 1].expand(draws, -1, -1, -1), [1000 * i + d for d in range(draws)], 4, settings)
        big = torch.nn.functional.interpolate(lrs.lr, scale_factor=4, mode="nearest")
        cells = [hr[i], *big]
        rows.append(torch.cat([image_to_uint8(c) for c in cells], dim=-1))
    img = torch.cat(rows, dim=-2).permute(1, 2, 0).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bicubic-model", default="models:/oftsr-student@champion")
    ap.add_argument("--bicubic-tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    ap.add_argument("--realworld-model", default="models:/oftsr-realworld-student@champion")
    ap.add_argument("--realworld-tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    ap.add_argument("--knobs", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "realworld_eval.json"))
    ap.add_argument("--grid", default=str(ROOT / "docs" / "images" / "realworld_grid.png"))
    args = ap.parse_args(argv)

    tree = pipeline("realworld_quickstart")
    ev = dataclasses.replace(tree.evaluate, source=str(ROOT / tree.evaluate.source), knobs=tuple(args.knobs))
    hr, skipped = held_out_crops(ev)
    students = {
        "bicubic-trained": _student(args.bicubic_model, args.bicubic_tracking_uri),
        "real-world": _student(args.realworld_model, args.realworld_tracking_uri),
    }
    clean = dataclasses.replace(ev, method=dataclasses.replace(ev.method, degradation="bicubic"))
    results = {}
    for inputs, settings in (("real-world-degraded", ev), ("clean bicubic", clean)):
        for name, net in students.items():
            part = evaluate_shard(hr, settings, student=net, progress=False)
            rows = combine([part], settings)["rows"]
            results.setdefault(inputs, {})[name] = [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "per_crop"} for r in rows
            ]
    big = dataclasses.replace(ev, method=dataclasses.replace(ev.method, crop=192), crops_per_image=2)
    grid(held_out_crops(big)[0][:4], tree.data.realesrgan.on_crops(), 4, Path(args.grid))
    out = {
        "benchmark": "realworld_eval",
        "command": ".venv/bin/python benchmarks/realworld_eval.py",
        "held_out": f"{hr.shape[0]} crops of {ev.method.crop}x{ev.method.crop} from {tree.evaluate.source}",
        "skipped": skipped,
        "models": {
            "bicubic-trained": [args.bicubic_model, args.bicubic_tracking_uri],
            "real-world": [args.realworld_model, args.realworld_tracking_uri],
        },
        "chain": "realworld_quickstart's data.realesrgan (the official OFTSR settings), per crop from the seed",
        "results": results,
        "machine": describe(),
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["results"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
