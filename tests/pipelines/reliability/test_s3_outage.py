"""Object storage going away during a Ray Data read: a real S3-compatible server (moto) on its own port,
stopped and restarted while the read runs."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
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
    process, so they survive a restart, as they would on a real store). While it is down, the port is held by a
    listener that drops every connection it accepts (a store that fails mid-request) and counts them: the proof
    that reads were tried during the outage."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._down: socket.socket | None = None
        self.dropped = 0
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self._down is not None:  # the dropping listener lets go of the port first (shutdown wakes its accept)
            with contextlib.suppress(OSError):
                self._down.shutdown(socket.SHUT_RDWR)
            self._down.close()
            self._dropper.join(10)
            self._down = None
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self, *, drop: bool = False) -> None:
        """Stop the server; with ``drop``, the dropping listener holds the port until :meth:`start`."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if not drop:
            return
        down = socket.socket()
        down.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        down.bind(("127.0.0.1", self.port))
        down.listen(64)
        self._down = down
        self._dropper = threading.Thread(target=self._drop, args=(down,), daemon=True)
        self._dropper.start()

    def _drop(self, down: socket.socket) -> None:
        while True:
            try:
                conn, _ = down.accept()
            except OSError:  # closed by start()
                return
            self.dropped += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a FIN
            conn.close()


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
    store.stop(drop=True)
    dropped = store.dropped

    def restart_once_reads_failed() -> None:  # the store comes back only after reads have failed on it
        deadline = time.time() + 120
        while store.dropped < dropped + 2 and time.time() < deadline:
            time.sleep(0.05)
        store.start()

    restart = threading.Thread(target=restart_once_reads_failed)
    restart.start()
    rows = ds.take_all()  # the reads begin while the server is down and go on after it is back
    restart.join()
    assert store.dropped >= dropped + 2  # reads were tried during the outage (and failed there)
    assert len(rows) == len(photos())
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
