"""MLflow going away in the middle of a run: training never blocks or crashes, and no metric is lost."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pipelines.metric_logger import MetricLogger
from pipelines.tracking import client
from tests.conftest import free_port
from tests.helpers import start_mlflow_server, stop_process_group, wait_reachable

pytestmark = pytest.mark.timeout(400)


def steps(uri: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, "loss"))


def wait_for(predicate, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast: the test controls the outage
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        wait_reachable(uri, server)
        c = client(uri)
        run_id = c.create_run(c.create_experiment("outage")).info.run_id
        spool = tmp_path / "spool"
        logger = MetricLogger(uri, run_id, background=True, spool_dir=str(spool), retry_every_s=0.5)
        senders = []  # the threads the logger talks to the server from: never the training step's
        log_batch = logger._client.log_batch

        def recorded(*args, **kwargs):
            senders.append(threading.current_thread().name)
            return log_batch(*args, **kwargs)

        monkeypatch.setattr(logger._client, "log_batch", recorded)
        logger.log({"loss": 1.0}, step=1)
        wait_for(lambda: steps(uri, run_id) == [(1, 1.0)])

        stop_process_group(server)  # the tracking server goes away mid-run
        logger.log({"loss": 2.0}, step=2)
        logger.log({"loss": 3.0}, step=3)
        wait_for(lambda: (spool / f"{run_id}.jsonl").exists())
        assert senders and set(senders) == {"oftsr-mlflow"}, senders  # a training step never waits on the server

        server = start_mlflow_server(tmp_path, port)  # back, same store
        wait_reachable(uri, server)
        logger.log({"loss": 4.0}, step=4)
        assert logger.close(timeout_s=60) is None
        assert steps(uri, run_id) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        assert not list(spool.iterdir())

        # Down at the end of the run: the records stay in the spool file, which is reported, and replay sends it.
        stop_process_group(server)
        late = MetricLogger(uri, run_id, spool_dir=str(spool))
        late.log({"loss": 5.0}, step=5)
        with pytest.warns(UserWarning, match="oftsr tracking replay"):
            left = late.close(timeout_s=5)
        assert left == str(spool / f"{run_id}.jsonl")
        server = start_mlflow_server(tmp_path, port)
        wait_reachable(uri, server)
        out = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "tracking", "replay", left, "--tracking-uri", uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "1 record" in out.stdout, out.stderr
        assert steps(uri, run_id)[-1] == (5, 5.0) and not list(spool.iterdir())
    finally:
        stop_process_group(server)
