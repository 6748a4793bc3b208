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

    from pipelines.data.manifest import list_images, manifest_hash, write_manifest

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

    from pipelines.overrides import apply_overrides, flatten, parse_sets
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

    from pipelines.overrides import apply_overrides, flatten, parse_sets
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

    from pipelines.overrides import apply_overrides, flatten, parse_sets
    from pipelines.recipes import recipe

    cfg = apply_overrides(recipe(args.recipe, "trajectories"), parse_sets(args.set))
    if args.dry_run:
        print(json.dumps(flatten(cfg), indent=2, default=str))
        return 0
    from pipelines.cache.stage import run_trajectories
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

    from pipelines.cache.store import list_caches, verify_cache

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


def _evaluate(args: argparse.Namespace) -> int:
    from oftsr.evaluation import EvalSettings, evaluate, write_report
    from pipelines.pipeline import EvalConfig, held_out_crops
    from pipelines.registry import load_model

    student, meta = load_model(args.student, tracking_uri=args.tracking_uri)
    teacher = load_model(args.teacher, tracking_uri=args.tracking_uri)[0] if args.teacher else None
    cfg = EvalConfig(source=args.source, crop=args.crop, crops_per_image=args.crops_per_image, knobs=tuple(args.knobs))
    hr, skipped = held_out_crops(cfg)
    for item in skipped:
        print(f"skipped {item}", file=sys.stderr)
    settings = EvalSettings(
        sigma_p=float(meta["sigma_p"]),
        sf=int(meta["sf"]),
        degradation=meta["degradation"],
        knobs=cfg.knobs,
        teacher_method="midpoint" if args.teacher_steps else "rk45",
        teacher_steps=args.teacher_steps or None,
    )
    report = evaluate(hr, settings, student=student, teacher=teacher)
    paths = write_report(report, args.out)
    print((paths["markdown"]).read_text(), end="")
    print(f"curve: {paths['curve']}")
    if args.run_id:
        from pipelines.tracking import client

        for path in paths.values():
            client(args.tracking_uri).log_artifact(args.run_id, str(path), "evaluation")
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


def _submit(args: argparse.Namespace) -> int:
    from pipelines import submit

    job_id = submit.submit(
        args.address,
        args.target,
        args.recipe,
        args.set,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        job_id=args.job_id,
    )
    print(job_id, flush=True)
    if not args.wait:
        return 0
    final = submit.wait(args.address, job_id, follow=not args.quiet)
    print(f"job {job_id}: {final}", file=sys.stderr)
    return submit.EXIT_CODES[final]


def _jobs(args: argparse.Namespace) -> int:
    from pipelines import submit

    if args.action == "status":
        state = submit.status(args.address, args.job_id)
        print(state)
        return submit.EXIT_CODES[state]
    if args.action == "logs":
        print(submit.logs(args.address, args.job_id), end="")
        return 0
    if args.action == "wait":
        state = submit.wait(args.address, args.job_id, follow=False)
        print(state)
        return submit.EXIT_CODES[state]
    stopped = submit.stop(args.address, args.job_id)
    print("stopped" if stopped else "not running")
    return 0


def _tracking(args: argparse.Namespace) -> int:
    from pipelines.tracking import replay_spool

    total = 0
    for path in args.files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such spool file")
        total += replay_spool(args.tracking_uri, path)
    print(f"sent {total} record{'s' if total != 1 else ''} from {len(args.files)} spool file(s) to {args.tracking_uri}")
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

    def recipe_command(name: str, text: str, example: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="recipe name: quickstart, ffhq_x4, ffhq_x4_noisy, div2k_x4, imagenet_x4")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=func)
        return p

    recipe_command(
        "run",
        "the whole pipeline: teacher, (trajectories,) distill, evaluate, register",
        "--set teacher.total_images=3200 --set distill.targets=cached",
        _run,
    )
    recipe_command(
        "teacher",
        "train the conditional rectified-flow teacher (Ray Train)",
        "--set optim.lr=3e-4 --set workers=4",
        _stage,
    )
    recipe_command(
        "distill",
        "distill the teacher into the one-step student (Ray Train)",
        "--set targets=cached --set cache=URI",
        _stage,
    )
    t = recipe_command(
        "trajectories",
        "precompute the teacher-trajectory cache (Ray Data actor pool)",
        "--set points_per_sample=6",
        _trajectories,
    )
    t.add_argument("--max-shards", type=int, default=0, help="stop after this many new shards (0: all)")

    c = sub.add_parser("cache", help="list or verify trajectory caches")
    c.add_argument("action", choices=["ls", "verify"])
    c.add_argument("uri", help="ls: the cache root (OUT or OUT/trajectories); verify: one cache's URI")
    c.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("-v", "--verbose", action="store_true", help="ls: print each cache's key")
    c.set_defaults(func=_cache)

    ev = sub.add_parser("evaluate", help="bicubic, teacher and student over the knob grid on held-out images")
    ev.add_argument("--student", required=True, help="models:/NAME@ALIAS, model folder, or checkpoint/run folder")
    ev.add_argument("--teacher", default=None, help="the teacher, same forms (optional)")
    ev.add_argument("--source", required=True, help="held-out images: folder, s3:// prefix")
    ev.add_argument("-o", "--out", default="outputs/evaluation", help="report folder (default: %(default)s)")
    ev.add_argument("--crop", type=int, default=64, help="HR crop size (default: %(default)s)")
    ev.add_argument("--crops-per-image", type=int, default=8, help="crops per held-out image (default: 8)")
    ev.add_argument("--knobs", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(11)])
    ev.add_argument("--teacher-steps", type=int, default=0, help="midpoint steps for the teacher (0: adaptive RK45)")
    ev.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ev.add_argument("--run-id", default=None, help="also log the report to this MLflow run")
    ev.set_defaults(func=_evaluate)

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

    default_address = os.environ.get("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    j = sub.add_parser("submit", help="submit the pipeline (RECIPE) or one stage (STAGE RECIPE) as a Ray job")
    j.add_argument("target", help="a recipe (whole pipeline) or a stage: teacher, trajectories, distill")
    j.add_argument("recipe", nargs="?", help="the recipe, when TARGET is a stage")
    j.add_argument("--address", default=default_address, help="Ray job server (default: %(default)s)")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    j.add_argument("--num-cpus", type=float, default=0.5, help="CPUs reserved for the driver (default: 0.5)")
    j.add_argument("--num-gpus", type=float, default=0, help="GPUs reserved for the driver (default: 0)")
    j.add_argument("--job-id", default=None, help="submission id (default: generated)")
    j.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's final status")
    j.add_argument("--quiet", action="store_true", help="with --wait: do not print the logs")
    j.set_defaults(func=_submit)

    jb = sub.add_parser("jobs", help="status, logs, wait for or stop a submitted job")
    jb.add_argument("action", choices=["status", "logs", "wait", "stop"])
    jb.add_argument("job_id")
    jb.add_argument("--address", default=default_address, help="Ray job server (default: %(default)s)")
    jb.set_defaults(func=_jobs)

    tr = sub.add_parser("tracking", help="re-send MLflow records kept in a spool file during a tracking outage")
    tr.add_argument("action", choices=["replay"])
    tr.add_argument("files", nargs="+", help="spool files (<run id>.jsonl) named by the warning of the run")
    tr.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    tr.set_defaults(func=_tracking)

    s = sub.add_parser("samples", help="export the sample photos shipped in installed wheels as PNGs")
    s.add_argument("folder", nargs="?", default="outputs/sample_photos")
    s.set_defaults(func=_samples)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, ConnectionError, TimeoutError, KeyError, LookupError) as err:
        print(f"oftsr {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # library errors (MLflow, Ray) that reach the top: still one line, no traceback
        if type(err).__module__.split(".")[0] not in ("mlflow", "ray", "botocore", "s3fs", "fsspec", "pyarrow"):
            raise
        print(f"oftsr {args.command}: error: {type(err).__name__}: {_message(err)}", file=sys.stderr)
        return 2


def _message(err: BaseException) -> str:
    """The first line of an error, with credentials masked (:mod:`pipelines.redact`)."""
    from pipelines.redact import redact_text

    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return redact_text(text.strip().splitlines()[0] if text.strip() else type(err).__name__)


if __name__ == "__main__":
    sys.exit(main())
