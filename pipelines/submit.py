"""Ray Jobs submission: ``oftsr submit RECIPE|STAGE --address http://HEAD:8265`` and ``oftsr jobs ...``.

The runtime environment ships this project (``working_dir``), never credentials: workers get them from their own
environment (instance role, Kubernetes secret). Exit codes follow the job's final status.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from pipelines.redact import is_sensitive

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3, "PENDING": 4, "RUNNING": 4}
STAGES = ("teacher", "distill", "trajectories")
EXCLUDES = [
    ".venv",
    ".git",
    "outputs",
    "mlruns",
    "mlflow.db",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "benchmarks/results",
]


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def entrypoint(target: str, recipe: str | None, sets: list[str]) -> str:
    """``oftsr run RECIPE`` or ``oftsr STAGE RECIPE`` with the overrides, shell-quoted."""
    args = ["python", "-m", "pipelines.cli"]
    if target in STAGES:
        if not recipe:
            raise ValueError(f"submit {target} needs a recipe: oftsr submit {target} RECIPE ...")
        args += [target, recipe]
    else:
        if recipe:
            raise ValueError(f"unexpected argument {recipe!r}: submit either RECIPE or STAGE RECIPE")
        args += ["run", target]
    for s in sets:
        key = s.partition("=")[0].strip()
        if is_sensitive(key) or ("storage_options" in key and any(w in s.lower() for w in ("secret", "key", "token"))):
            raise ValueError(
                f"--set {key}=...: credentials are not sent in a job's entrypoint (the Ray dashboard shows it to "
                "everyone); give the cluster's nodes their credentials through their environment (instance role, "
                "Kubernetes secret)"
            )
        args += ["--set", s]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env = {"PYTHONUNBUFFERED": "1"}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    env.update(extra_env or {})
    return {"working_dir": str(project_root()), "excludes": EXCLUDES, "env_vars": env}


def _auth_headers() -> dict[str, str]:
    """Clusters with token authentication (Ray's default once a token exists) need it on every request: taken
    from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; never printed."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if os.path.isfile(path):
            with open(path) as f:
                token = f.read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers() or None)
    except Exception as err:
        raise ConnectionError(f"no Ray job server at {address}: {str(err).splitlines()[0][:200]}") from err


def submit(
    address: str,
    target: str,
    recipe: str | None,
    sets: list[str],
    *,
    num_cpus: float = 0,
    num_gpus: float = 0,
    job_id: str | None = None,
    agent_wait_s: float = 120.0,
) -> str:
    """Submit; a cluster whose job agent is still starting ("no available agent") is retried for up to
    ``agent_wait_s`` seconds. The arguments are checked before any connection is made. A job that reserves no
    resources (the default) has its driver on the head node, where losing a worker node cannot kill it."""
    command, env = entrypoint(target, recipe, sets), runtime_env()
    c = client(address)
    deadline = time.time() + agent_wait_s
    while True:
        try:
            return c.submit_job(
                entrypoint=command,
                runtime_env=env,
                submission_id=job_id,
                entrypoint_num_cpus=num_cpus or None,
                entrypoint_num_gpus=num_gpus or None,
                metadata={"oftsr.target": target, "oftsr.recipe": recipe or target},
            )
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(3)


def describe(address: str, target: str, recipe: str | None, sets: list[str], num_cpus: float = 0, num_gpus: float = 0):
    """``oftsr submit --dry-run``: what the job would run and where, from the recipe resolved here with the same
    overrides (the job resolves it again on the cluster): job server, entrypoint, where the driver runs, the code it
    ships, the MLflow server and the storage every stage writes to. Local paths and a local MLflow store are flagged:
    on a cluster of more than one node the stages refuse them (:mod:`pipelines.preflight`)."""
    from pipelines.data.storage import protocol_of
    from pipelines.overrides import parse_sets
    from pipelines.recipes import pipeline
    from pipelines.tree import with_overrides

    command = entrypoint(target, recipe, sets)
    stage = target if target in STAGES else None
    tree = with_overrides(pipeline(recipe if stage else target), parse_sets(sets), stage or "run")
    stages = [stage] if stage else [s for s in STAGES if s != "trajectories" or tree.distill.targets == "cached"]
    places: list[tuple[str, str]] = [("data", tree.data.source)]
    for s in stages:
        cfg = tree.stage(s)
        places.append((f"{s} storage", cfg.out if s == "trajectories" else cfg.storage_path))
    if not stage:
        places.append(("held-out photos", tree.evaluate.source))
    uri = tree.tracking.tracking_uri
    lines = [
        f"{'job server:':<18}{address} (not contacted: --dry-run)",
        f"{'entrypoint:':<18}{command}",
        f"{'driver:':<18}"
        + (
            f"any node with {num_cpus:g} CPU / {num_gpus:g} GPU free (reserved)"
            if num_cpus or num_gpus
            else "the head node (the job reserves nothing)"
        ),
        f"{'code:':<18}working_dir {project_root()} (excluding {', '.join(EXCLUDES)})",
        f"{'MLflow:':<18}{uri}"
        + (
            ""
            if uri.startswith(("http://", "https://"))
            else "  <- local to the driver: workers on other nodes cannot reach it (use an MLflow server)"
        ),
    ]
    for name, where in places:
        where = str(where)
        local = protocol_of(where) == "file"  # the rule preflight applies on the cluster
        lines.append(f"{name + ':':<18}{where}" + ("  <- local path: every node must mount it" if local else ""))
    if not stage:
        lines.append(f"{'reports:':<18}{tree.out} (written by the driver, on its node; also logged to MLflow)")
    return "\n".join(lines)


def wait(address: str, job_id: str, *, timeout_s: float = 0, follow: bool = True, log=print) -> str:
    """Wait for the job's final status (printing its logs when ``follow``); returns the status name."""
    c = client(address)
    start, printed = time.time(), 0
    while True:
        status = str(c.get_job_status(job_id).value)
        if follow:
            logs = c.get_job_logs(job_id)
            if len(logs) > printed:
                log(logs[printed:].rstrip("\n"))
                printed = len(logs)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if timeout_s and time.time() - start > timeout_s:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(2)


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
