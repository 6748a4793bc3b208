"""The bodies of the ``oftsr`` subcommands (:mod:`pipelines.cli` parses the arguments and calls them)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from pipelines.overrides import parse_sets


def _quickstart(args: argparse.Namespace) -> int:
    from oftsr.training import OptimConfig
    from pipelines.local_teacher import LocalTeacherConfig, run

    cfg = LocalTeacherConfig(
        out_dir=args.out,
        photos_dir=args.photos,
        steps=args.steps,
        batch=args.batch,
        optim=OptimConfig(lr=args.lr, warmup_images=args.warmup_images),
        ema_half_life_images=args.ema_half_life_images,
        seed=args.seed,
        threads=args.threads,
    )
    if args.dry_run:
        print(cfg)
        return 0
    run(cfg)
    return 0


def _manifest(args: argparse.Namespace) -> int:
    import time

    from pipelines.data.manifest import list_images, manifest_hash, write_manifest

    options = parse_sets(args.storage_option, flag="--storage-option")
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


def _tree(args: argparse.Namespace):
    """The recipe tree with the command's ``--set`` overrides; an override that would not be taken is refused."""
    from pipelines.recipes import pipeline
    from pipelines.tree import with_overrides

    return with_overrides(pipeline(args.recipe), parse_sets(args.set), args.command)


def _dry_run(tree, stage: str | None = None) -> int:
    import json

    shown = tree.shown()
    if stage:  # the tree's shared parts and this stage's own fields
        shown = {k: v for k, v in shown.items() if k.split(".")[0] not in ("teacher", "trajectories", "distill")}
        shown.update({f"{stage}.{k}": v for k, v in flatten_stage(tree, stage).items()})
    print(json.dumps(shown, indent=2, default=str))
    return 0


def flatten_stage(tree, stage: str) -> dict:
    from pipelines.overrides import flatten

    own = flatten(tree.stage(stage))
    return {k: v for k, v in own.items() if not k.startswith(("method.", "data.", "tracking."))}


def _run(args: argparse.Namespace) -> int:
    import json

    tree = _tree(args)
    if args.dry_run:
        return _dry_run(tree)
    from pipelines.pipeline import run_pipeline

    _ensure_samples(tree.data.source)
    summary = run_pipeline(tree, started=getattr(args, "started", None))
    print(json.dumps({k: summary[k] for k in ("run_id", "curve", "trend", "time_s")}, default=str))
    return 0


def _stage(args: argparse.Namespace) -> int:
    import json

    tree = _tree(args)
    if args.dry_run:
        return _dry_run(tree, args.command)
    cfg = tree.stage(args.command)
    _ensure_samples(tree.data.source)
    if args.command == "trajectories":
        return _trajectories(cfg, args.max_shards)
    from pipelines.train.driver import run_stage

    result = run_stage(cfg)
    print(json.dumps({k: result[k] for k in ("run_id", "checkpoint", "images_seen")}, default=str))
    return 0


def _trajectories(cfg, max_shards: int) -> int:
    import dataclasses
    import json

    from pipelines.cache.stage import run_trajectories
    from pipelines.train.driver import absolute

    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, source=absolute(cfg.data.source), manifest=absolute(cfg.data.manifest)),
        teacher=absolute(cfg.teacher),
        out=absolute(cfg.out),
        tracking=cfg.tracking.resolved(),
    )
    result = run_trajectories(cfg, max_shards=max_shards)
    print(json.dumps({k: result.get(k) for k in ("uri", "rows", "complete")}))
    return 0 if result["complete"] or max_shards else 1


def _cache(args: argparse.Namespace) -> int:
    import json

    from pipelines.cache.store import list_caches, verify_cache

    options = parse_sets(args.storage_option, flag="--storage-option")
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
    from oftsr.evaluation import evaluate, write_report
    from oftsr.method import Method, check_agrees
    from pipelines.pipeline import held_out_crops
    from pipelines.registry import load_model
    from pipelines.tree import EvalConfig

    if args.protocol == "paper":
        return _evaluate_paper(args)
    student, meta = load_model(args.student, tracking_uri=args.tracking_uri)
    method = Method.from_record(meta, f"the student {args.student}")  # the parameters it was trained with
    teacher = None
    if args.teacher:
        teacher, teacher_meta = load_model(args.teacher, tracking_uri=args.tracking_uri)
        check_agrees(method, teacher_meta, f"the teacher {args.teacher}", ("sf", "degradation", "sigma_y", "sigma_p"))
    if args.crop:
        method = dataclasses.replace(method, crop=args.crop)
    cfg = EvalConfig(
        source=args.source,
        method=method,
        crops_per_image=args.crops_per_image,
        knobs=tuple(args.knobs),
        teacher_method="midpoint" if args.teacher_steps else "rk45",
        teacher_steps=args.teacher_steps or None,
    )
    hr, skipped = held_out_crops(cfg)
    for item in skipped:
        print(f"skipped {item}", file=sys.stderr)
    report = evaluate(hr, cfg, student=student, teacher=teacher)
    paths = write_report(report, args.out)
    print((paths["markdown"]).read_text(), end="")
    print(f"curve: {paths['curve']}")
    if args.run_id:
        from pipelines.tracking import client

        for path in paths.values():
            client(args.tracking_uri).log_artifact(args.run_id, str(path), "evaluation")
    return 0


def _evaluate_paper(args: argparse.Namespace) -> int:
    from pipelines.paper_eval import paper_evaluation
    from pipelines.registry import load_model

    if not args.task:
        raise ValueError("--protocol paper needs --task (ffhq, ffhq_noisy, div2k or imagenet)")
    student, meta = load_model(args.student, tracking_uri=args.tracking_uri)
    teacher, teacher_meta = load_model(args.teacher, tracking_uri=args.tracking_uri) if args.teacher else (None, None)
    report = paper_evaluation(
        args.task,
        args.source,
        student=student,
        student_meta=meta,
        teacher=teacher,
        teacher_meta=teacher_meta,
        out=args.out,
        device=args.device,
    )
    print((Path(args.out) / f"paper_{args.task}.md").read_text(), end="")
    if args.run_id:
        from pipelines.tracking import client

        for suffix in ("json", "md"):
            client(args.tracking_uri).log_artifact(args.run_id, str(Path(args.out) / f"paper_{args.task}.{suffix}"))
    return 0 if report["images"] else 2


def _upscale(args: argparse.Namespace) -> int:
    from pipelines.batch_upscale import UpscaleJob, run

    job = UpscaleJob(
        sources=tuple(args.inputs),
        dest=args.output,
        knobs=tuple(args.t),
        model=args.model,
        tracking_uri=args.tracking_uri,
        engine=args.engine,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        tile=args.tile,
        seed=args.seed,
        device=args.device,
        force=args.force,
        storage_options=parse_sets(args.storage_option, flag="--storage-option"),
    )
    report = run(job)
    if report["images_skipped"] and not report["images_done"] and not report["images_already_done"]:
        first = "; ".join(report["skipped"][:3])
        print(f"oftsr upscale: error: no image could be upscaled: {first}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pipelines.serve import build_app, serve_forever

    app = build_app(
        args.model,
        args.tracking_uri,
        replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        max_batch_size=args.max_batch_size,
        max_pixels=args.max_pixels,
    )
    serve_forever(app, host=args.host, port=args.port)
    return 0


def _import(args: argparse.Namespace) -> int:
    from pipelines.importer import import_checkpoint
    from pipelines.tracking import TrackingConfig

    tracking_uri = TrackingConfig(tracking_uri=args.tracking_uri).resolved().tracking_uri
    result = import_checkpoint(
        args.checkpoint,
        kind=args.kind,
        recipe=args.recipe,
        raw=args.raw,
        out=args.out,
        tracking_uri=tracking_uri,
        name=args.name,
    )
    print(f"use it as {result['uri']}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines import submit

    if args.dry_run:
        print(submit.describe(args.address, args.target, args.recipe, args.set, args.num_cpus, args.num_gpus))
        return 0
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
    from pipelines.metric_logger import replay_spool

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
