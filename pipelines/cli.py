"""The ``oftsr`` command."""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipelines.commands import (
    _cache,
    _evaluate,
    _import,
    _jobs,
    _manifest,
    _quickstart,
    _run,
    _samples,
    _serve,
    _stage,
    _submit,
    _tracking,
    _upscale,
)
from pipelines.tracking import default_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oftsr", description="One-step flow super-resolution (OFTSR) pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("local-teacher", help="one process, no Ray: train the tiny teacher on the sample photos")
    q.add_argument("--out", default="outputs/quickstart", help="output folder (default: %(default)s)")
    q.add_argument("--photos", default="outputs/sample_photos", help="sample photo folder (default: %(default)s)")
    q.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
    q.add_argument("--batch", type=int, default=16, help="crops per step (default: %(default)s)")
    q.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    q.add_argument("--warmup-images", type=int, default=800, help="linear warm-up, in images (default: %(default)s)")
    q.add_argument(
        "--ema-half-life-images", type=float, default=1000.0, help="EMA half-life in images (default: %(default)s)"
    )
    q.add_argument("--seed", type=int, default=0, help="seed of the weights, crops and noise (default: %(default)s)")
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
        "--set method.sigma_p=0.3 --set distill.targets=online",
        _run,
    )
    recipe_command(
        "teacher",
        "train the conditional rectified-flow teacher (Ray Train)",
        "--set teacher.optim.lr=3e-4 --set teacher.workers=4",
        _stage,
    )
    recipe_command(
        "distill",
        "distill the teacher into the one-step student (Ray Train)",
        "--set distill.targets=cached --set distill.cache=URI",
        _stage,
    )
    t = recipe_command(
        "trajectories",
        "precompute the teacher-trajectory cache (Ray Data actor pool)",
        "--set trajectories.points_per_sample=6",
        _stage,
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
    ev.add_argument("--crop", type=int, default=0, help="HR crop size (default: the crop the student was trained on)")
    ev.add_argument("--crops-per-image", type=int, default=8, help="crops per held-out image (default: 8)")
    ev.add_argument("--knobs", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(11)])
    ev.add_argument("--teacher-steps", type=int, default=0, help="midpoint steps for the teacher (0: adaptive RK45)")
    ev.add_argument("--tracking-uri", default=default_tracking_uri())
    ev.add_argument("--run-id", default=None, help="also log the report to this MLflow run")
    ev.add_argument(
        "--protocol",
        choices=["heldout", "paper"],
        default="heldout",
        help="heldout: random crops of SOURCE's images over the knob grid (default); paper: the paper's 100 images of "
        "--task from SOURCE, as the official code evaluates them (knob ends, centre crops, unclamped PSNR/LPIPS)",
    )
    ev.add_argument("--task", choices=["ffhq", "ffhq_noisy", "div2k", "imagenet"], help="with --protocol paper")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ev.set_defaults(func=_evaluate)

    u = sub.add_parser(
        "upscale",
        help="4x upscale images (files, folders, s3:// prefixes or a manifest) with the one-step student",
        description="Outputs are DEST/<path below the source, without extension>_t<t>.png, written atomically; a "
        "rerun skips images whose outputs exist; bad inputs are skipped and counted; DEST/_upscale_report.json "
        "sums up. A handful of local files runs in this process; more, or object storage, run as a Ray Data "
        "pipeline (fetch + decode, the student in an actor pool, encode + write).",
    )
    u.add_argument("inputs", nargs="+", help="image files, folders, s3:// prefixes, or a manifest (.parquet)")
    u.add_argument("-o", "--output", required=True, help="DEST: output folder or s3:// prefix")
    u.add_argument("--t", type=float, nargs="+", default=[0.5], help="knob value(s) in [0, 1]: 0 fidelity, 1 realism")
    u.add_argument(
        "--model",
        default="models:/oftsr-student@champion",
        help="models:/NAME@ALIAS, a downloaded model folder, or a checkpoint folder (default: %(default)s)",
    )
    u.add_argument(
        "--tracking-uri",
        default=default_tracking_uri(),
        help="MLflow tracking/registry URI for models:/ (default: $MLFLOW_TRACKING_URI or %(default)s)",
    )
    u.add_argument(
        "--engine",
        choices=["auto", "local", "ray"],
        default="auto",
        help="local: this process; ray: Ray Data; auto: local for up to 16 local images (default)",
    )
    u.add_argument("--workers", type=int, default=0, help="ray: inference actors (default: by GPUs or CPUs)")
    u.add_argument("--gpus-per-worker", type=float, default=0.0, help="ray: GPUs per inference actor (default: 0)")
    u.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: CPUs per inference actor (default: 1)")
    u.add_argument("--batch-size", type=int, default=4, help="ray: images per actor call (default: %(default)s)")
    u.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help="fsspec option")
    u.add_argument("--tile", type=int, default=0, help="HR tile size (default: the model's training crop)")
    u.add_argument("--force", action="store_true", help="recompute images whose outputs exist")
    u.add_argument("--device", default="cpu", help="local engine: cpu or cuda")
    u.add_argument("--seed", type=int, default=0, help="noise seed (each image's own seed derives from it)")
    u.set_defaults(func=_upscale)

    sv = sub.add_parser("serve", help="serve the student over HTTP with Ray Serve: POST /upscale?t=, GET / (knob page)")
    sv.add_argument("model", nargs="?", default="models:/oftsr-student@champion", help="default: %(default)s")
    sv.add_argument("--tracking-uri", default=default_tracking_uri())
    sv.add_argument("--host", default="127.0.0.1", help="default: %(default)s (0.0.0.0 to listen on every interface)")
    sv.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    sv.add_argument("--replicas", type=int, default=1, help="default: %(default)s")
    sv.add_argument("--gpus-per-replica", type=float, default=0.0, help="default: %(default)s")
    sv.add_argument("--cpus-per-replica", type=float, default=1.0, help="default: %(default)s")
    sv.add_argument("--max-batch-size", type=int, default=8, help="requests batched into one call (default: 8)")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest input accepted (default: 4096²)")
    sv.set_defaults(func=_serve)

    im = sub.add_parser("import", help="import an official OFTSR checkpoint (.pth) and register it (alias official)")
    im.add_argument("checkpoint", help="the .pth file, e.g. sr_bicubic-sf4-guided_unet-sigma0.1-...-checkpoint_10.pth")
    im.add_argument("--as", dest="kind", required=True, choices=["teacher", "student"], help="what the file holds")
    im.add_argument(
        "--recipe",
        default=None,
        choices=["ffhq_x4", "ffhq_x4_noisy", "div2k_x4", "imagenet_x4"],
        help="the task (default: the one the file name says)",
    )
    im.add_argument("--raw", action="store_true", help="the raw 'model' weights instead of the EMA (resume files only)")
    im.add_argument("-o", "--out", default=None, help="checkpoint folder (default: outputs/imported/<file stem>)")
    im.add_argument("--name", default=None, help="registered model name (default: oftsr-teacher / oftsr-student)")
    im.add_argument("--tracking-uri", default=default_tracking_uri())
    im.set_defaults(func=_import)

    default_address = os.environ.get("RAY_API_SERVER_ADDRESS", os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    j = sub.add_parser("submit", help="submit the pipeline (RECIPE) or one stage (STAGE RECIPE) as a Ray job")
    j.add_argument("target", help="a recipe (whole pipeline) or a stage: teacher, trajectories, distill")
    j.add_argument("recipe", nargs="?", help="the recipe, when TARGET is a stage")
    j.add_argument("--address", default=default_address, help="Ray job server (default: %(default)s)")
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    j.add_argument(
        "--num-cpus",
        type=float,
        default=0,
        help="CPUs reserved for the driver (default: 0: a job that reserves nothing runs on the head node; reserving "
        "CPUs or GPUs lets Ray place the driver on any node that has them)",
    )
    j.add_argument("--num-gpus", type=float, default=0, help="GPUs reserved for the driver (default: 0)")
    j.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the job would run and where (job server, entrypoint, MLflow, storage) without submitting",
    )
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
    tr.add_argument("--tracking-uri", default=default_tracking_uri())
    tr.set_defaults(func=_tracking)

    s = sub.add_parser("samples", help="export the sample photos shipped in installed wheels as PNGs")
    s.add_argument("folder", nargs="?", default="outputs/sample_photos")
    s.set_defaults(func=_samples)
    return parser


def quiet_libraries() -> None:
    """Deprecation and future warnings raised inside Ray, MLflow and other libraries are theirs to fix, not the user's:
    hidden unless ``--verbose`` (our own calls raise none: the tests turn them into errors)."""
    import logging
    import warnings

    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module="(ray|mlflow|pydantic|torchvision|lpips|stlpips)")
    for name in ("mlflow", "alembic", "ray", "urllib3", "botocore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own level when imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A local cluster that turned token authentication on says so at every start; the opposite warning stays.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")
    )


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # the time breakdown of `oftsr run` counts from here
    parser = build_parser()
    parser.add_argument("-v", "--verbose", action="store_true", help="Ray's and the libraries' own logs on the console")
    args = parser.parse_args(argv)
    args.started = started
    if args.verbose:
        os.environ["OFTSR_VERBOSE"] = "1"
    else:
        quiet_libraries()
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
