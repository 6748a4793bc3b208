import socket

from oftsr.raycluster import _alive


def test_a_stale_cluster_record_is_not_taken_for_a_live_cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert _alive(f"127.0.0.1:{port}")
    assert not _alive(f"127.0.0.1:{port}")  # closed now: the driver starts its own cluster instead of hanging
    assert not _alive("not-an-address")
