"""MLflow tracking for the pipeline layer: one run per stage (nested under a pipeline run when a parent is given),
found again on resume by its run key, so a resumed stage keeps logging into the same run.

Only the driver creates runs and logs params; inside Ray Train only rank 0 logs metrics and images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "oftsr.run_key"
#: Where runs go when nothing says otherwise: a SQLite file in the working directory.
LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (what ``oftsr submit`` forwards and the KubeRay manifests set), else the local
    SQLite file. The one default of every command and stage."""
    return os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING_URI


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs go. Workers must reach ``tracking_uri`` (an HTTP server on multi-node clusters)."""

    tracking_uri: str = dataclasses.field(default_factory=default_tracking_uri)
    experiment: str = "oftsr"
    parent_run_id: str | None = None

    def resolved(self) -> TrackingConfig:
        """Relative SQLite paths made absolute, so Ray workers in other folders open the same file."""
        path = _sqlite_path(self.tracking_uri)
        if path is not None and not path.startswith("/"):
            return dataclasses.replace(self, tracking_uri=_SQLITE + os.path.abspath(path))
        return self


_SQLITE = "sqlite:///"


def _sqlite_path(tracking_uri: str) -> str | None:
    """The database file of a ``sqlite:///`` URI (relative, or absolute after a fourth slash); None for others."""
    return tracking_uri[len(_SQLITE) :] if tracking_uri.startswith(_SQLITE) else None


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (raised before any compute is spent)."""


@contextlib.contextmanager
def _fast_fail() -> Iterator[None]:
    """Few, short HTTP retries while probing, so an unreachable server is reported in seconds."""
    keys = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def check_reachable(tracking_uri: str) -> None:
    """Raise :class:`TrackingUnavailable` unless the tracking store answers."""
    with _fast_fail():
        try:
            client(tracking_uri).search_experiments(max_results=1)
        except Exception as err:
            from pipelines.redact import redact_text

            raise TrackingUnavailable(
                redact_text(
                    f"MLflow tracking at {tracking_uri} is not reachable: {type(err).__name__}: {str(err)[:200]}"
                )
            ) from err


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (``mlruns/`` in its folder) rather than
    in whatever folder the command ran from (MLflow's default); the server's own choice otherwise."""
    path = _sqlite_path(tracking_uri)
    return None if path is None else (Path(path).resolve().parent / "mlruns").as_uri()


def _experiment_id(c, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(tracking_uri))
    except Exception:  # created concurrently
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_or_resume_run(
    tracking_uri: str,
    experiment: str,
    *,
    key: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """The id of the run tagged with ``key`` (resumed) or of a new one; returns ``(run_id, resumed)``.

    Params are logged once, on creation; a resumed run keeps them (no duplicate-param errors).
    """
    from mlflow.entities import Param, RunStatus

    c = client(tracking_uri)
    exp_id = _experiment_id(c, experiment, tracking_uri)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    all_tags = {RUN_KEY_TAG: key, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id, False


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)
