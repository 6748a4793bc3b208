"""How fast the distill stage's cached-target stream starts and flows: a small trajectory cache listed as one pass
(``cached_dataset``), consumed as a training worker does (``iter_crops``: batches of 8 from a 128-row shuffle
buffer), beside the layout it replaced (a union of one dataset per listing) in the same run; and one Parquet read of
the cache with Ray Data's 32 footer-reading actors beside the one ``_read_shards`` starts for it.

Run: ``.venv/bin/python benchmarks/cache_read.py`` (about 6 minutes on 2 cores; local Ray, a cache written by the
trajectory stage from a perturbed tiny teacher). Writes ``benchmarks/results/cache_read.json`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402
from machine import describe  # noqa: E402

from oftsr.method import Method  # noqa: E402
from oftsr.samples import export_sample_photos  # noqa: E402
from pipelines.cache.config import TrajectoryConfig  # noqa: E402
from pipelines.cache.dataset import CachedTargets, _apply, _read_shards, cached_dataset  # noqa: E402
from pipelines.cache.stage import run_trajectories  # noqa: E402
from pipelines.cache.store import read_manifest  # noqa: E402
from pipelines.data.config import DataConfig  # noqa: E402
from pipelines.data.loader import iter_crops  # noqa: E402
from pipelines.tracking import TrackingConfig  # noqa: E402
from tests.helpers import perturbed_unet, save_net_checkpoint  # noqa: E402


def make_cache(root: Path) -> str:
    export_sample_photos(root / "photos")
    torch.manual_seed(0)
    net = perturbed_unet(0.02).eval()
    save_net_checkpoint(root / "teacher" / "checkpoint_000000000001", net, {"stage": "teacher"})
    cfg = TrajectoryConfig(
        run_name="bench",
        data=DataConfig(source=str(root / "photos"), crop=64),
        crops_per_image=4,
        method=Method(crop=64),
        teacher=str(root / "teacher"),
        out=str(root / "cache"),
        grid=(0.01, 0.5, 0.99),
        keys_per_shard=2,
        batch=8,
        concurrency=2,
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
    )
    return run_trajectories(cfg)["uri"]


def union_of_listings(uri: str, min_epoch_rows: int, seed: int):
    """The layout before: one dataset per listing (blocks in their own order), unioned."""
    manifest = read_manifest(uri)
    repeats = -(-min_epoch_rows // manifest["rows"])
    paths = [s["uri"] for s in manifest["shards"]]
    once = _read_shards(paths, None).repartition(min(manifest["rows"], 256)).materialize()
    order = random.Random(seed)
    listings = [once.randomize_block_order(seed=order.randrange(1 << 31)) for _ in range(repeats)]
    return (
        listings[0]
        .union(*listings[1:])
        .map_batches(
            _apply,
            fn_kwargs={"targets": CachedTargets(manifest)},
            batch_size=16,
            batch_format="numpy",
            num_cpus=0.25,
            compute=ray.data.TaskPoolStrategy(size=2),
        )
    )


def consume(build) -> dict:
    started = time.perf_counter()
    ds = build()
    built = time.perf_counter() - started
    first, rows = None, 0
    for batch in iter_crops(ds, 8, shuffle_buffer=128, shuffle_seed=1):
        first = first if first is not None else time.perf_counter() - started
        rows += len(batch["t"])
    wall = time.perf_counter() - started
    return {
        "rows": rows,
        "build_s": round(built, 2),
        "first_batch_s": round(first, 2),
        "wall_s": round(wall, 2),
        "rows_per_s": round(rows / wall, 1),
    }


def read_once(paths: list[str], footer_actors: str | None) -> float:
    if footer_actors is not None:
        os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = footer_actors
    try:
        started = time.perf_counter()
        _read_shards(paths, None).take_all()
        return round(time.perf_counter() - started, 2)
    finally:
        os.environ.pop("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_read.json"))
    parser.add_argument("--epoch-rows", type=int, default=2048, help="rows per pass (the stage's default)")
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="cache-read") as tmp:
        uri = make_cache(Path(tmp))
        manifest = read_manifest(uri)
        paths = [s["uri"] for s in manifest["shards"]]
        read_once(paths, None)  # warm-up: workers started, files in the page cache
        reads = {"ray_default_32": [], "ours": []}
        for _ in range(3):
            reads["ray_default_32"].append(read_once(paths, "32"))
            reads["ours"].append(read_once(paths, None))

        def refs():
            return cached_dataset(uri, min_epoch_rows=args.epoch_rows, num_cpus=0.25, concurrency=2)[0]

        consume(refs)  # warm-up: the map tasks' workers started (the first pass measured pays for them)
        before = consume(lambda: union_of_listings(uri, args.epoch_rows, seed=0))
        current = consume(refs)
    results = {
        "benchmark": "cache_read",
        "command": "python benchmarks/cache_read.py",
        "cache": {"rows": manifest["rows"], "shards": len(paths), "bytes": manifest["bytes"]},
        "epoch_rows": args.epoch_rows,
        "one_read_s": {k: sorted(v) for k, v in reads.items()},
        "pass_block_refs": current,
        "pass_union_of_listings": before,
        "speedup_rows_per_s": round(current["rows_per_s"] / before["rows_per_s"], 1),
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
