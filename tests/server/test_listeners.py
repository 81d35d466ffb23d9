"""The front ends' listening sockets: one per front end on one port (SO_REUSEPORT), connections spread
over all of them, and the port stays exclusive: a second server on it is refused, whatever it sets."""
from __future__ import annotations

import socket

import pytest

from server.cli import bind_socket, port_group

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="the platform has no SO_REUSEPORT")


def accepted(sock: socket.socket) -> int:
    """Connections waiting in `sock`'s queue, accepted (and closed) now."""
    sock.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_connections_spread_over_one_socket_per_front_end_and_the_port_stays_exclusive() -> None:
    group = port_group(bind_socket("127.0.0.1", 0, reuse_port=True), 3)
    clients: list[socket.socket] = []
    try:
        port = group[0].getsockname()[1]
        assert len(group) == 3 and {s.getsockname()[1] for s in group} == {port}
        assert all(s.get_inheritable() for s in group)
        with pytest.raises(OSError):  # another server on the port: refused, with or without SO_REUSEPORT
            bind_socket("127.0.0.1", port)
        with pytest.raises(OSError):
            bind_socket("127.0.0.1", port, reuse_port=True)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(48)]
        counts = [accepted(s) for s in group]
        # the kernel hashes each connection to one socket: all 48 arrive, each socket gets some
        # (one of three getting none has a probability of about 1e-8)
        assert sum(counts) == 48 and min(counts) > 0, counts
    finally:
        for s in [*clients, *group]:
            s.close()


def test_without_reuse_port_every_front_end_shares_the_one_socket() -> None:
    first = bind_socket("127.0.0.1", 0)
    try:
        assert port_group(first, 3) == [first]  # SO_REUSEPORT was not set: nothing else binds the port
        assert port_group(first, 1) == [first]
    finally:
        first.close()
