"""Checks before a stage spends cluster time: shared storage on multi-node clusters, and an MLflow tracking
server that the workers can reach."""

from __future__ import annotations

from pipelines.data.storage import protocol_of


def preflight(storage_path: str, tracking_uri: str, *, storage_shared: bool = False, what: str = "storage_path"):
    """Checks before any GPU time is spent. On a cluster of several nodes the storage must be shared (object
    storage, or a local path declared a shared mount) and MLflow must be an HTTP server; an HTTP tracking server
    must answer from a worker too."""
    import ray

    from pipelines.tracking import TrackingUnavailable, check_reachable

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        if protocol_of(storage_path) == "file" and not storage_shared:
            raise ValueError(
                f"{what} {storage_path} is a local path, but the Ray cluster has {len(nodes)} nodes: use s3://... "
                f"or a file system mounted on every node (then set storage_shared=true)"
            )
        if not tracking_uri.startswith(("http://", "https://", "databricks")):
            raise ValueError(
                f"tracking.tracking_uri {tracking_uri} is local to this machine, but the Ray cluster has {len(nodes)} "
                f"nodes: run an MLflow server (`mlflow server`) and pass its http:// URI"
            )
    if tracking_uri.startswith(("http://", "https://")):
        probe = ray.remote(num_cpus=0)(check_reachable)
        try:
            ray.get(probe.remote(tracking_uri), timeout=60)
        except Exception as err:
            raise TrackingUnavailable(
                f"MLflow at {tracking_uri} is not reachable from the Ray workers: {str(err).splitlines()[-1][:200]}"
            ) from err
