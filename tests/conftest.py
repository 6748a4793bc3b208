"""Fixtures: a real S3-compatible server (moto) on 127.0.0.1 for the session, and a local Ray cluster per module.

The Ray cluster over-declares CPUs (this machine has 2 cores): with 1-CPU workers, Ray Data's read tasks could
never be scheduled and a test would hang instead of failing.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A fresh local cluster per test module. A shared one accumulated pinned workers: after a failed Ray Data
    pass (the S3-outage test) Ray keeps the failed tasks' workers alive holding references, and once they fill
    the idle-worker limit (num_cpus) every later task started, and paid for, a new worker process: about 20 a
    minute through the training tests at the end of the suite, each importing PyTorch."""
    import ray

    from pipelines.raycluster import forget_stale_cluster

    forget_stale_cluster()  # Ray Train's workers would wait on a dead `ray start` head for 12 s per run
    ray.init(
        address="local",  # a new cluster, never a stale `ray start` record
        num_cpus=4,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}},
    )
    yield
    ray.shutdown()
