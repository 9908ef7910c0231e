"""`Connection.alive()` answers at once: a live connection with or without replies waiting, a
closed one (even with unread bytes), and never waits out the socket's timeout when another
thread read the waiting bytes first (it held the client's lock meanwhile: a CI deadlock)."""

from __future__ import annotations

import socket
import time

import pytest

from sdk.connection import Connection


@pytest.fixture
def pair():
    mine, daemon = socket.socketpair()
    mine.settimeout(30)  # as a client's socket: CPython then waits for data even on MSG_DONTWAIT
    conn = object.__new__(Connection)
    conn.closed, conn._sock = False, mine
    yield conn, mine, daemon
    mine.close()
    daemon.close()


def _quick(conn: Connection) -> bool:
    t0 = time.monotonic()
    answer = conn.alive()
    assert time.monotonic() - t0 < 1.0
    return answer


def test_alive_without_and_with_replies_waiting(pair) -> None:
    conn, mine, daemon = pair
    assert _quick(conn)
    daemon.sendall(b"reply")
    assert _quick(conn)
    assert mine.recv(5) == b"reply"  # another thread read them
    assert _quick(conn)


def test_closed_by_the_daemon_even_with_bytes_unread(pair) -> None:
    conn, _, daemon = pair
    daemon.sendall(b"last words")
    daemon.close()
    assert not _quick(conn)


def test_closed_here() -> None:
    mine, daemon = socket.socketpair()
    conn = object.__new__(Connection)
    conn.closed, conn._sock = True, mine
    assert not conn.alive()
    mine.close()
    daemon.close()
