"""The ``oftsr`` command."""

from __future__ import annotations

import argparse
import os
import sys


def _quickstart(args: argparse.Namespace) -> int:
    from pipelines.local_teacher import LocalTeacherConfig, run

    cfg = LocalTeacherConfig(
        out_dir=args.out, photos_dir=args.photos, steps=args.steps, batch=args.batch, threads=args.threads
    )
    if args.dry_run:
        print(cfg)
        return 0
    run(cfg)
    return 0


def _key_values(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _manifest(args: argparse.Namespace) -> int:
    import time

    from oftsr.data.manifest import list_images, manifest_hash, write_manifest

    options = _key_values(args.storage_option)
    start = time.perf_counter()
    rows = list_images(args.uri, options, workers=args.workers)
    write_manifest(rows, args.output, options)
    total = sum(r["size"] for r in rows)
    print(
        f"{len(rows)} images, {total / 1e6:.1f} MB, hash {manifest_hash(rows)}, listed in "
        f"{time.perf_counter() - start:.1f} s -> {args.output}"
    )
    return 0


def _ensure_samples(source: str | None) -> None:
    """The embedded default reads the sample photos: export them (train / held-out split) on first use."""
    from pipelines.recipes import SAMPLE_PHOTOS

    if source and source.startswith(SAMPLE_PHOTOS):
        from oftsr.samples import export_sample_split

        export_sample_split(SAMPLE_PHOTOS)


def _run(args: argparse.Namespace) -> int:
    import json

    from oftsr.overrides import apply_overrides, flatten, parse_sets
    from pipelines.recipes import RECIPES, pipeline

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; available: {sorted(RECIPES)}")
    cfg = apply_overrides(pipeline(args.recipe), parse_sets(args.set))
    if args.dry_run:
        print(json.dumps(flatten(cfg), indent=2, default=str))
        return 0
    from pipelines.pipeline import run_pipeline

    _ensure_samples(cfg.teacher.data.source)
    summary = run_pipeline(cfg)
    print(json.dumps({k: summary[k] for k in ("run_id", "curve", "trend")}, default=str))
    return 0


def _stage(args: argparse.Namespace) -> int:
    import json

    from oftsr.overrides import apply_overrides, flatten, parse_sets
    from pipelines.recipes import recipe

    cfg = apply_overrides(recipe(args.recipe, args.command), parse_sets(args.set))
    if args.dry_run:
        print(json.dumps(flatten(cfg), indent=2, default=str))
        return 0
    from pipelines.stages import run_stage

    _ensure_samples(cfg.data.source)
    result = run_stage(cfg)
    print(json.dumps({k: result[k] for k in ("run_id", "checkpoint", "images_seen")}, default=str))
    return 0


def _trajectories(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from oftsr.overrides import apply_overrides, flatten, parse_sets
    from pipelines.recipes import recipe

    cfg = apply_overrides(recipe(args.recipe, "trajectories"), parse_sets(args.set))
    if args.dry_run:
        print(json.dumps(flatten(cfg), indent=2, default=str))
        return 0
    from oftsr.cache.stage import run_trajectories
    from pipelines.stages import absolute

    _ensure_samples(cfg.data.source)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, source=absolute(cfg.data.source), manifest=absolute(cfg.data.manifest)),
        teacher=absolute(cfg.teacher),
        out=absolute(cfg.out),
        tracking=cfg.tracking.resolved(),
    )
    result = run_trajectories(cfg, max_shards=args.max_shards)
    print(json.dumps({k: result.get(k) for k in ("uri", "rows", "complete")}))
    return 0 if result["complete"] or args.max_shards else 1


def _cache(args: argparse.Namespace) -> int:
    import json

    from oftsr.cache.store import list_caches, verify_cache

    options = _key_values(args.storage_option)
    if args.action == "ls":
        caches = list_caches(args.uri, options)
        for c in caches:
            state = (
                f"{c['rows']} rows, {c['bytes'] / 1e6:.1f} MB"
                if c["complete"]
                else (f"INCOMPLETE ({c['shards_done']} shards, no manifest)")
            )
            print(f"{c['uri']}  {state}")
            if c["complete"] and args.verbose:
                print(json.dumps(c["key"], indent=2))
        if not caches:
            print(f"no caches under {args.uri}")
        return 0
    report = verify_cache(args.uri, options)
    print(f"ok: {report['shards']} shards, {report['rows']} rows, {report['bytes'] / 1e6:.1f} MB in {report['uri']}")
    return 0


def _upscale(args: argparse.Namespace) -> int:
    from pipelines.upscale import run_upscale

    run_upscale(
        args.inputs,
        args.output,
        args.t,
        model=args.model,
        tracking_uri=args.tracking_uri,
        tile=args.tile,
        force=args.force,
        device=args.device,
        seed=args.seed,
    )
    return 0


def _samples(args: argparse.Namespace) -> int:
    from oftsr.samples import export_sample_photos

    paths = export_sample_photos(args.folder)
    print(f"{len(paths)} sample photos in {args.folder} (licences in LICENSES.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oftsr", description="One-step flow super-resolution (OFTSR) pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("local-teacher", help="one process, no Ray: train the tiny teacher on the sample photos")
    q.add_argument("--out", default="outputs/quickstart", help="output folder (default: %(default)s)")
    q.add_argument("--photos", default="outputs/sample_photos", help="sample photo folder (default: %(default)s)")
    q.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
    q.add_argument("--batch", type=int, default=16, help="crops per step (default: %(default)s)")
    q.add_argument("--threads", type=int, default=0, help="torch threads, 0 for the default")
    q.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    q.set_defaults(func=_quickstart)

    m = sub.add_parser("manifest", help="list the images under a folder or s3:// prefix into a Parquet manifest")
    m.add_argument("uri", help="folder, s3://bucket/prefix, or another fsspec URI")
    m.add_argument("-o", "--output", required=True, help="manifest path or URI (.parquet)")
    m.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (credentials: use the env)",
    )
    m.add_argument("--workers", type=int, default=16, help="parallel listing threads (default: %(default)s)")
    m.set_defaults(func=_manifest)

    r = sub.add_parser("run", help="the whole pipeline: teacher, (trajectories,) distill, evaluate, register")
    r.add_argument("recipe", help="recipe name: quickstart, ffhq_x4, ffhq_x4_noisy, div2k_x4, imagenet_x4")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set teacher.total_images=3200 --set distill.targets=cached",
    )
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    r.set_defaults(func=_run)

    for stage, text in (
        ("teacher", "train the conditional rectified-flow teacher (Ray Train)"),
        ("distill", "distill the teacher into the one-step student (Ray Train)"),
    ):
        p = sub.add_parser(stage, help=text)
        p.add_argument("recipe", help="recipe name: quickstart, ffhq_x4, ffhq_x4_noisy, div2k_x4, imagenet_x4")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set optim.lr=3e-4 --set workers=4",
        )
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=_stage)

    t = sub.add_parser("trajectories", help="precompute the teacher-trajectory cache (Ray Data actor pool)")
    t.add_argument("recipe", help="recipe name (see `oftsr teacher --help`)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.add_argument("--max-shards", type=int, default=0, help="stop after this many new shards (0: all)")
    t.set_defaults(func=_trajectories)

    c = sub.add_parser("cache", help="list or verify trajectory caches")
    c.add_argument("action", choices=["ls", "verify"])
    c.add_argument("uri", help="ls: the cache root (OUT or OUT/trajectories); verify: one cache's URI")
    c.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("-v", "--verbose", action="store_true", help="ls: print each cache's key")
    c.set_defaults(func=_cache)

    u = sub.add_parser("upscale", help="4x upscale PNG/JPEG files or folders with the one-step student")
    u.add_argument("inputs", nargs="+", help="image files or folders")
    u.add_argument("-o", "--output", required=True, help="output folder for the PNGs")
    u.add_argument("--t", type=float, nargs="+", default=[0.5], help="knob value(s) in [0, 1]: 0 fidelity, 1 realism")
    u.add_argument(
        "--model",
        default="models:/oftsr-student@champion",
        help="models:/NAME@ALIAS, a downloaded model folder, or a checkpoint folder (default: %(default)s)",
    )
    u.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking/registry URI for models:/ (default: $MLFLOW_TRACKING_URI or %(default)s)",
    )
    u.add_argument("--tile", type=int, default=0, help="HR tile size (default: the model's training crop)")
    u.add_argument("--force", action="store_true", help="overwrite existing outputs")
    u.add_argument("--device", default="cpu", help="cpu or cuda")
    u.add_argument("--seed", type=int, default=0, help="noise seed")
    u.set_defaults(func=_upscale)

    s = sub.add_parser("samples", help="export the sample photos shipped in installed wheels as PNGs")
    s.add_argument("folder", nargs="?", default="outputs/sample_photos")
    s.set_defaults(func=_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"oftsr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
