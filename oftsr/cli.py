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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"oftsr {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
