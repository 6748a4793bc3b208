"""The ``oftsr`` command."""

from __future__ import annotations

import argparse
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


def _stage(args: argparse.Namespace) -> int:
    import json

    from oftsr.overrides import apply_overrides, flatten, parse_sets
    from pipelines.recipes import recipe

    cfg = apply_overrides(recipe(args.recipe, args.command), parse_sets(args.set))
    if args.dry_run:
        print(json.dumps(flatten(cfg), indent=2, default=str))
        return 0
    from pipelines.stages import run_stage

    if cfg.data.source == "outputs/sample_photos":
        from oftsr.samples import export_sample_photos

        export_sample_photos(cfg.data.source)
    result = run_stage(cfg)
    print(json.dumps({k: result[k] for k in ("run_id", "checkpoint", "images_seen")}, default=str))
    return 0


def _samples(args: argparse.Namespace) -> int:
    from oftsr.samples import export_sample_photos

    paths = export_sample_photos(args.folder)
    print(f"{len(paths)} sample photos in {args.folder} (licences in LICENSES.md)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oftsr", description="One-step flow super-resolution (OFTSR) pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="train the tiny teacher on the sample photos and compare with bicubic")
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
