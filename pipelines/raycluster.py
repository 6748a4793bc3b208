"""Connecting the driver to Ray: the cluster named by ``RAY_ADDRESS`` (Ray Jobs set it), else a live cluster
started on this machine with ``ray start``, else a new local cluster (the embedded default). A stale record of a
cluster that is gone is removed instead of hanging the driver (and its workers)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

CURRENT_CLUSTER_FILE = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")


def _alive(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def forget_stale_cluster(record: str = CURRENT_CLUSTER_FILE) -> str | None:
    """The address of the live ``ray start`` cluster recorded on this machine, or None, removing a stale record.

    ``ray start`` writes the record and only ``ray stop`` removes it, so a head that was killed leaves it behind.
    Ray's own processes read it whenever they call the State API without an address: Ray Train's placement-group
    cleaner does so once a second, and with a record of a dead cluster every call waits on that cluster, which
    stops the cleaner from working and adds 12 s to the end of every training run on the local cluster.
    """
    try:
        with open(record) as f:
            address = f.read().strip() or None
    except OSError:
        return None
    if address and _alive(address):
        return address
    with contextlib.suppress(OSError):
        os.remove(record)  # what `ray stop` would have done
    return None


def verbose() -> bool:
    """``oftsr --verbose`` (or ``OFTSR_VERBOSE=1``): Ray's and the libraries' own logs on the console."""
    return os.environ.get("OFTSR_VERBOSE", "") not in ("", "0")


def ensure_ray(**kwargs) -> None:
    """``ray.init`` once, choosing the cluster as described above. Unless :func:`verbose`, the workers' output and
    Ray's own messages stay in the session's log files (``/tmp/ray/session_latest/logs``), not on the console."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if not verbose():
        kwargs = {"log_to_driver": False, "logging_level": logging.WARNING, **kwargs}
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    ray.init(address="auto" if forget_stale_cluster() else "local", **kwargs)
