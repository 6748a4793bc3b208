"""Connecting the driver to Ray: the cluster named by ``RAY_ADDRESS`` (Ray Jobs set it), else a live cluster
started on this machine with ``ray start``, else a new local cluster (the embedded default). A stale record of a
cluster that is gone is ignored instead of hanging the driver."""

from __future__ import annotations

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


def ensure_ray(**kwargs) -> None:
    """``ray.init`` once, choosing the cluster as described above."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    address = None
    try:
        with open(CURRENT_CLUSTER_FILE) as f:
            address = f.read().strip() or None
    except OSError:
        pass
    ray.init(address="auto" if address and _alive(address) else "local", **kwargs)
