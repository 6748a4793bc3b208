"""Object storage going away during a Ray Data read: a real S3-compatible server (moto) on its own port,
stopped and restarted while the read runs."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipelines.data.config import DataConfig
from pipelines.data.storage import StorageError
from pipelines.data.transforms import fetch_image
from tests.conftest import free_port
from tests.pipelines.data.images import photos

BUCKET = "oftsr-outage"
pytestmark = pytest.mark.timeout(300)


class Server:
    """A moto server that can be stopped and started again on the same port (the objects live in the test
    process, so they survive a restart, as they would on a real store)."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture(scope="module")
def store(s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    for key, data in photos().items():
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
    server = Server()
    yield server
    server.stop()


def test_a_read_across_an_outage_retries_with_backoff_and_loses_nothing(store, ray_cluster):
    from pipelines.data.dataset import training_dataset

    cfg = DataConfig(
        source=f"s3://{BUCKET}",
        crop=64,
        crops_per_image=1,
        batch_size=2,
        storage_options={"endpoint_url": store.endpoint},
    )
    ds, ledger = training_dataset(cfg)  # lists the bucket now; the images are read lazily below
    store.stop()
    restart = threading.Timer(3.0, store.start)
    restart.start()
    start = time.perf_counter()
    rows = ds.take_all()  # the reads begin while the server is down and go on after it is back
    restart.join()
    assert len(rows) == len(photos()) and time.perf_counter() - start > 2.5
    summary = ledger.summary()
    assert summary["seen"] == len(photos()) and summary["skipped"] == 0  # an outage is not a bad image


def test_past_the_retry_budget_the_stage_stops_with_the_key(store, ray_cluster):
    from pipelines.data.dataset import training_dataset

    fast = {"endpoint_url": store.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
    key = f"s3://{BUCKET}/{sorted(photos())[0]}"
    store.stop()
    try:
        with pytest.raises(StorageError, match=rf"{key}: read failed after 3 attempts: EndpointConnectionError"):
            fetch_image(key, fast, retries=2)
        cfg = DataConfig(source=f"s3://{BUCKET}", crop=64, batch_size=2, read_retries=1, storage_options=fast)
        store.start()
        ds, _ = training_dataset(cfg)
        store.stop()
        with pytest.raises(Exception, match=rf"s3://{BUCKET}/\S+: read failed after 2 attempts") as info:
            ds.take_all()
        assert "StorageError" in str(info.value)
    finally:
        store.start()
