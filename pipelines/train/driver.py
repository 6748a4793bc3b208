"""Driver side of the training stages: the stage protocol (:mod:`pipelines.stage`) around ``TorchTrainer``.

``run_stage(cfg)`` is what ``oftsr teacher`` and ``oftsr distill`` call. Running it again with the same
``run_name`` and ``storage_path`` resumes from the latest checkpoint (Ray Train V2 restores the run) and keeps
logging into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

from oftsr.method import check_agrees
from pipelines.data.storage import filesystem, protocol_of
from pipelines.metric_logger import MetricLogger
from pipelines.overrides import flatten
from pipelines.progress import progress_of
from pipelines.stage import StageRun, prepare, tracked_run
from pipelines.train.config import StageConfig


def absolute(p: str | None) -> str | None:
    """A local path made absolute (Ray workers do not share the driver's working directory); URIs unchanged."""
    if not p or p.startswith(("models:/", "runs:/")) or protocol_of(p) != "file":  # URIs unchanged
        return p
    return os.path.abspath(p)


def resolve_paths(cfg: StageConfig) -> StageConfig:
    """Absolute local paths and an absolute SQLite URI."""
    local = absolute

    data = dataclasses.replace(cfg.data, source=local(cfg.data.source), manifest=local(cfg.data.manifest))
    return dataclasses.replace(
        cfg,
        data=data,
        storage_path=local(cfg.storage_path),
        teacher=local(cfg.teacher),
        pretrained=local(cfg.pretrained),
        cache=local(cfg.cache),
        tracking=cfg.tracking.resolved(),
    )


def storage_for(cfg: StageConfig) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: object stores go through the same fsspec
    filesystem (endpoint, options) as the data plane."""
    if protocol_of(cfg.storage_path) == "file":
        return cfg.storage_path, None
    import pyarrow.fs

    fs, path = filesystem(cfg.storage_path, cfg.data.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def log_cache_input(cfg: StageConfig, run_id: str, manifest: dict[str, Any]) -> None:
    """Record the trajectory cache as an MLflow dataset input of the distill run (idempotent on resume)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from pipelines.tracking import client

    c = client(cfg.tracking.tracking_uri)
    digest = manifest["hash"]
    if any(d.dataset.digest == digest for d in c.get_run(run_id).inputs.dataset_inputs):
        return
    dataset = Dataset(
        name=f"trajectories-{digest}",
        digest=digest,
        source_type="trajectory_cache",
        source=json.dumps({"uri": cfg.cache}),
        schema=json.dumps({"rows": manifest["rows"]}),
        profile=json.dumps({"rows": manifest["rows"], "bytes": manifest["bytes"]}),
    )
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])


def run_stage(cfg: StageConfig, *, log=print) -> dict[str, Any]:
    """Run (or resume) a training stage; returns ``{"run_id", "checkpoint", "images_seen", "metrics", ...}``."""
    from pipelines.data.dataset import source_rows
    from pipelines.data.manifest import manifest_hash

    called = time.time()  # the stage's start-up (stage/startup_s) runs from here to the first optimisation step
    configured = cfg.storage_path  # the resume key: as configured, not as resolved in this working directory
    cfg = resolve_paths(cfg)
    if not cfg.teacher and cfg.stage == "distill":
        raise ValueError("distill.teacher: the distill stage needs the teacher checkpoint (a folder or URI)")
    if cfg.targets == "cached" and not cfg.cache:
        raise ValueError("distill.cache: targets=cached needs the trajectory cache URI (set cache=URI)")
    if cfg.stage == "distill" and cfg.teacher.startswith(("models:/", "runs:/")):
        cfg = dataclasses.replace(cfg, teacher=pin_registered_teacher(cfg))
    prepare(cfg.tracking, cfg.storage_path, storage_shared=cfg.storage_shared)
    cache_manifest = None
    if cfg.targets == "cached":
        from pipelines.cache.store import read_manifest as read_cache_manifest

        cache_manifest = read_cache_manifest(cfg.cache, cfg.data.storage_options)  # refuses an incomplete cache
        check_cache_matches(cfg, cache_manifest)
        rows, data_hash = [], cache_manifest["key"]["manifest_hash"]
    else:
        rows = source_rows(cfg.data)
        data_hash = manifest_hash(rows)
    with tracked_run(
        cfg.stage,
        cfg.tracking,
        key=(configured, cfg.run_name),
        run_name=cfg.run_name,
        params=flatten(cfg),
        tags={"oftsr.data_manifest_hash": data_hash, "oftsr.preset": cfg.method.preset},
        log=log,
    ) as run:
        return _train(cfg, run, rows, cache_manifest, log, called)


def pin_registered_teacher(cfg: StageConfig) -> str:
    """A registered teacher's pinned URI (``models:/NAME/N``: an alias may move while the stage runs or between its
    attempts), after checking that it was made with this stage's method parameters (its version's tags)."""
    from pipelines.registry import pin_model_uri
    from pipelines.tracking import client

    pinned, _ = pin_model_uri(cfg.teacher, tracking_uri=cfg.tracking.tracking_uri)
    if pinned.startswith("models:/"):
        name, _, version = pinned[len("models:/") :].rpartition("/")
        tags = client(cfg.tracking.tracking_uri).get_model_version(name, version).tags
        record = {k.removeprefix("oftsr."): v for k, v in tags.items() if k.startswith("oftsr.")}
        if record.get("kind", "teacher") != "teacher":
            raise ValueError(f"distill.teacher: {cfg.teacher} is a {record['kind']} model, not a teacher")
        check_agrees(cfg.method, record, f"the teacher {cfg.teacher}", ("sf", "degradation", "sigma_y", "sigma_p"))
    return pinned


def check_cache_matches(cfg: StageConfig, manifest: dict[str, Any]) -> None:
    """Refuse a trajectory cache made with other method parameters than this distillation's, naming the field."""
    key = manifest["key"]
    deg, solver = key["degradation"], key["solver"]
    record = {"sf": deg["sf"], "degradation": deg["kind"], "sigma_y": deg["sigma_y"], "sigma_p": key["sigma_p"]}
    record.update(crop=key["crop"], t_min=solver["t_min"], t_max=solver["t_max"])
    check_agrees(cfg.method, record, f"the trajectory cache {cfg.cache}")


def _train(cfg: StageConfig, run: StageRun, rows, cache_manifest, log, called: float) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.data.dataset import format_summary, training_dataset
    from pipelines.train.loop import train_loop_per_worker

    run_id = run.run_id
    started = time.perf_counter()
    source = f"{cache_manifest['rows']} cached rows" if cache_manifest is not None else f"{len(rows)} source images"
    log(f"{cfg.stage}: {source}, {cfg.total_images} images at {cfg.global_batch} per step on {cfg.workers} workers")

    if cache_manifest is not None:
        from pipelines.cache.dataset import cached_dataset

        dataset, _ = cached_dataset(
            cfg.cache,
            cfg.data.storage_options,
            num_cpus=cfg.data.num_cpus,
            concurrency=cfg.data.concurrency,
            seed=cfg.seed,
        )
        ledger = None
        log_cache_input(cfg, run_id, cache_manifest)
        log(f"distill: cached targets from {cfg.cache} ({cache_manifest['rows']} rows, no teacher in the loop)")
    else:
        dataset, ledger = training_dataset(cfg.data, rows=rows)
    storage_path, storage_fs = storage_for(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "mlflow_run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": dataset},
    )
    with progress_of(run, cfg.stage, total=cfg.total_images):
        result = trainer.fit()
    summary = ledger.summary() if ledger is not None else {"seen": 0, "skipped": 0, "reasons": {}, "items": []}
    out = dict(result.return_value or {})
    if ledger is not None:
        log(format_summary(summary))
    try:  # the training is done and checkpointed: a tracking outage now costs a record, never the result
        if ledger is not None:
            MetricLogger(cfg.tracking.tracking_uri, run_id).log_dict(summary, "data/skipped.json")
    except Exception as err:
        log(f"{cfg.stage}: warning: the data summary was not logged ({type(err).__name__}); the checkpoint is safe")
    if out.get("corrupt_checkpoints"):
        log(f"{cfg.stage}: warning: resumed from {out['resumed_from']}, passing over: {out['corrupt_checkpoints']}")
    if out.get("mlflow_spool"):
        log(f"{cfg.stage}: warning: metrics not yet in MLflow are kept in {out['mlflow_spool']} (on the rank-0 node)")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and storage_fs is not None:
        checkpoint = f"{protocol_of(cfg.storage_path)}://{checkpoint}"
    # The stage's honest rate: images trained in this session over its wall-clock, start-up of the workers and
    # the data pipeline included (train/images_per_s, logged by the workers, starts at their first batch).
    seconds = time.perf_counter() - started
    trained = int(out.get("images_seen") or 0) - int(out.get("images_at_start") or 0)
    rates = {"stage/seconds": seconds, "stage/images_per_s": trained / max(seconds, 1e-9)}
    startup = float(out["first_step_at"]) - called if out.get("first_step_at") else None
    if startup is not None:  # from the stage's call to its first optimisation step (workers, data, networks)
        rates["stage/startup_s"] = startup
    with contextlib.suppress(Exception):  # a tracking outage costs the record, never the result
        MetricLogger(cfg.tracking.tracking_uri, run_id).log(rates, step=int(out.get("images_seen") or 0))
    step_rate = out.get("train/step_images_per_s")
    log(
        f"{cfg.stage}: done at {out.get('images_seen')} images in {seconds:.0f} s: "
        f"{rates['stage/images_per_s']:.1f} images/s wall-clock"
        + (f" (optimisation steps alone {step_rate:.1f} images/s)" if step_rate else "")
        + (f", first step {startup:.0f} s after the start" if startup is not None else "")
        + f"; checkpoint {checkpoint}"
    )
    return {
        "run_id": run_id,
        "resumed": run.resumed,
        "checkpoint": checkpoint,
        "images_seen": out.get("images_seen"),
        "startup_s": startup,
        "metrics": out,
        "data": summary,
    }
