import socket

from pipelines.raycluster import _alive, forget_stale_cluster


def test_a_stale_cluster_record_is_not_taken_for_a_live_cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert _alive(f"127.0.0.1:{port}")
    assert not _alive(f"127.0.0.1:{port}")  # closed now: the driver starts its own cluster instead of hanging
    assert not _alive("not-an-address")


def test_a_stale_record_is_removed_and_a_live_one_kept(tmp_path):
    record = tmp_path / "ray_current_cluster"
    assert forget_stale_cluster(str(record)) is None  # no record at all
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        record.write_text(address + "\n")
        assert forget_stale_cluster(str(record)) == address
        assert record.read_text().strip() == address
    assert forget_stale_cluster(str(record)) is None  # that head is gone: Ray's workers must not wait on it
    assert not record.exists()
