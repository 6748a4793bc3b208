"""The one stage protocol. Every stage (teacher, trajectories, distill, the pipeline's evaluation and registration)
goes through the same steps, in this order:

1. the tracking server answers (before any compute is spent);
2. the driver is connected to Ray (quietly: Ray's own logs go to its session folder unless ``--verbose``);
3. preflight: storage and tracking reachable from every node of a multi-node cluster;
4. its MLflow run is started, or found again by its resume key and resumed, under the pipeline's run;
5. the stage runs, its progress shown on one line (:mod:`pipelines.progress`);
6. the run is finished (``FAILED`` when the stage raised; a tracking outage at that point costs a status, never
   the stage's result).

Resume keys are built from what the stage is and where its results go (its name, its storage URI as configured),
never from the driver's working directory: a job re-submitted in a new pod finds its runs again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipelines.preflight import preflight
from pipelines.raycluster import ensure_ray
from pipelines.tracking import (
    TrackingConfig,
    check_reachable,
    client,
    finish_run,
    git_commit,
    run_key,
    start_or_resume_run,
)


@dataclasses.dataclass
class StageRun:
    """The MLflow run of a stage in progress. Set ``status = None`` to leave it running (to be resumed)."""

    run_id: str
    resumed: bool
    tracking_uri: str
    status: str | None = "FINISHED"


def prepare(tracking: TrackingConfig, storage: str | None, *, storage_shared: bool = False, what: str = "storage_path"):
    """Steps 1-3: tracking reachable, Ray connected, preflight of ``storage`` (skipped when ``None``)."""
    check_reachable(tracking.tracking_uri)
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    if not os.environ.get("OFTSR_VERBOSE"):
        _quiet_ray_data_console()
    if storage is not None:
        preflight(storage, tracking.tracking_uri, storage_shared=storage_shared, what=what)


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (each dataset's plan) and its note that progress bars are off stay in its log file
    (``ray-data.log`` in the session's logs); its warnings and errors still reach the console."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not getattr(handler, "_oftsr_quiet", False):
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda record: not record.getMessage().startswith("Progress bars disabled"))
            handler._oftsr_quiet = True


def _tag_driver_node(tracking_uri: str, run_id: str) -> None:
    """``oftsr.driver_node``: the Ray node address of this driver (on a cluster: the head, see cluster/README.md)."""
    import ray

    if ray.is_initialized():
        with contextlib.suppress(Exception):  # a record, not a reason to stop
            client(tracking_uri).set_tag(run_id, "oftsr.driver_node", ray.util.get_node_ip_address())


@contextlib.contextmanager
def tracked_run(
    kind: str,
    tracking: TrackingConfig,
    *,
    key: tuple[str, ...],
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    log=print,
) -> Iterator[StageRun]:
    """Steps 4 and 6 around the body of a stage: its run, resumed by ``key`` (with ``kind``) under
    ``tracking.parent_run_id``; finished when the body returns, marked ``FAILED`` when it raises."""
    run_id, resumed = start_or_resume_run(
        tracking.tracking_uri,
        tracking.experiment,
        key=run_key(kind, *key),
        run_name=f"{kind}:{run_name}",
        params=params,
        tags={"oftsr.stage": kind, "oftsr.git_commit": git_commit(), **(tags or {})},
        parent_run_id=tracking.parent_run_id,
    )
    log(f"{kind}: MLflow run {run_id} ({'resumed' if resumed else 'new'})")
    _tag_driver_node(tracking.tracking_uri, run_id)
    run = StageRun(run_id, resumed, tracking.tracking_uri)
    try:
        yield run
    except BaseException:
        with contextlib.suppress(Exception):
            finish_run(tracking.tracking_uri, run_id, status="FAILED")
        raise
    if run.status is None:
        return
    try:
        finish_run(tracking.tracking_uri, run_id, status=run.status)
    except Exception as err:
        log(f"{kind}: warning: MLflow run {run_id} not closed ({type(err).__name__}); the stage's result is safe")
