"""Metric logging that survives a tracking outage: records go to MLflow (from a background thread inside training
workers), and while the server is unreachable they are spooled to a local JSONL file that is sent later, by the
logger itself or by ``oftsr tracking replay``."""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from pipelines.tracking import TrackingUnavailable, client


def default_spool_dir() -> str:
    return os.environ.get("OFTSR_SPOOL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "oftsr", "mlflow-spool")


class MetricLogger:
    """Metrics, tags and images into one run (rank 0 of a Ray Train worker group, or the driver).

    Tracking outages never stop training: a metric or tag batch that cannot be sent is appended to a local spool
    file (``<spool_dir>/<run_id>.jsonl``) and re-sent, oldest first, as soon as a later call gets through (also by
    a later logger of the same run, e.g. after a resume). With ``background=True`` a thread does the sending, so a
    slow or unreachable server never stalls a training step. :meth:`close` drains what it can within its timeout;
    whatever is left stays in the spool file, whose path is in :attr:`spool_file` and is reported.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        background: bool = False,
        spool_dir: str | None = None,
        retry_every_s: float = 30.0,
    ):
        self.run_id = run_id
        self._client = client(tracking_uri)
        self._spool = os.path.join(spool_dir or default_spool_dir(), f"{run_id}.jsonl")
        self._inflight = f"{self._spool}.sending"
        self._current: dict[str, Any] | None = None
        self._retry_every_s = retry_every_s
        self._last_failure = 0.0
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._drain, name="oftsr-mlflow", daemon=True)
        self._requeue_inflight()  # records a crashed logger of this run was sending
        if self._thread is not None:
            self._thread.start()

    @property
    def spool_file(self) -> str | None:
        """The spool file while it holds unsent records, else ``None``."""
        return self._spool if os.path.exists(self._spool) or os.path.exists(self._inflight) else None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._submit({"metrics": [[k, float(v), now, int(step)] for k, v in metrics.items()]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._submit({"tags": {k: str(v)[:5000] for k, v in tags.items()}})

    def log_image(self, image, artifact_file: str) -> None:
        """Images are previews: one that cannot be uploaded is dropped with a warning, never spooled."""
        try:
            self._client.log_image(self.run_id, image, artifact_file=artifact_file)
        except Exception as err:
            warnings.warn(f"MLflow: image {artifact_file} not logged ({type(err).__name__})", stacklevel=2)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self._client.log_dict(self.run_id, dict(data), artifact_file)

    def close(self, timeout_s: float = 60.0) -> str | None:
        """Send what is queued (and spooled) within ``timeout_s``; returns the spool file if records remain."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # stuck on an unreachable server: keep the rest on disk
                pending = [self._current] if self._current is not None else []
                while True:
                    try:
                        pending.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                for record in pending:
                    if record is not None:
                        self._append(record)
                self._requeue_inflight()
            self._thread = self._queue = None  # a record logged after close() is sent synchronously, not lost
        else:
            self._flush_spool(force=True)
        left = self.spool_file
        if left:
            warnings.warn(
                f"MLflow run {self.run_id}: records not yet sent are kept in {left}; they are re-sent by the "
                f"next logger of this run, or with `oftsr tracking replay {left}`",
                stacklevel=2,
            )
        return left

    # -- sending ---------------------------------------------------------------------------------------------
    def _submit(self, record: dict[str, Any]) -> None:
        if self._queue is not None:
            self._queue.put(record)
        else:
            self._deliver(record)

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            try:
                record = self._queue.get(timeout=self._retry_every_s)
            except queue.Empty:
                self._flush_spool()
                continue
            if record is None:
                self._flush_spool(force=True)
                return
            self._deliver(record)

    def _deliver(self, record: dict[str, Any]) -> None:
        self._current = record
        if not self._flush_spool() or not self._send(record):
            self._append(record)
        self._current = None

    def _send(self, record: dict[str, Any]) -> bool:
        from mlflow.entities import Metric, RunTag

        try:
            metrics = [Metric(*m) for m in record.get("metrics", [])]
            tags = [RunTag(k, v) for k, v in record.get("tags", {}).items()]
            for i in range(0, max(len(metrics), 1), 1000):
                self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000], tags=tags if i == 0 else [])
        except Exception as err:
            if not self._last_failure:
                warnings.warn(
                    f"MLflow unreachable ({type(err).__name__}); keeping records in {self._spool} until it is back",
                    stacklevel=2,
                )
            self._last_failure = time.time()
            return False
        self._last_failure = 0.0
        return True

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            os.makedirs(os.path.dirname(self._spool), exist_ok=True)
            with open(self._spool, "a") as f:
                f.write(json.dumps(record) + "\n")

    @staticmethod
    def _read(path: str) -> list[dict[str, Any]]:
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        """Under the lock: the spool becomes ``records`` followed by what was appended meanwhile."""
        records = records + self._read(self._spool)
        if records:
            tmp = f"{self._spool}.tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(tmp, self._spool)
        if os.path.exists(self._inflight):
            os.remove(self._inflight)

    def _requeue_inflight(self) -> None:
        with self._lock:
            if os.path.exists(self._inflight):
                self._rewrite(self._read(self._inflight))

    def _flush_spool(self, force: bool = False) -> bool:
        """Re-send the spool file, oldest first; ``False`` if records remain. Skipped within ``retry_every_s`` of
        a failure unless ``force``. The lock covers file operations only, never a request; records being sent sit
        in ``<spool>.sending`` so that a crash mid-send loses nothing."""
        if not os.path.exists(self._spool):
            return True
        if not force and self._last_failure and time.time() - self._last_failure < self._retry_every_s:
            return False
        with self._lock:
            records = self._read(self._spool)
            os.replace(self._spool, self._inflight)
        for i, record in enumerate(records):
            if not self._send(record):
                with self._lock:
                    self._rewrite(records[i:])
                return False
        with self._lock:
            if os.path.exists(self._inflight):
                os.remove(self._inflight)
        return True


def replay_spool(tracking_uri: str, path: str) -> int:
    """Send a spool file left by :class:`MetricLogger` (its name is the run id); returns the records sent."""
    run_id = os.path.basename(path).removesuffix(".jsonl")
    with open(path) as f:
        n = sum(1 for line in f if line.strip())
    logger = MetricLogger(tracking_uri, run_id, spool_dir=os.path.dirname(os.path.abspath(path)))
    if not logger._flush_spool(force=True):
        raise TrackingUnavailable(f"MLflow tracking at {tracking_uri}: {path} could not be sent; it is kept")
    return n
