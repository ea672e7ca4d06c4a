"""Worker threads keep their Python thread state per connection (plugin/threadstate.py),
and give it back when the connection closes: nothing grows with the number of connections."""

import re

import nbd
import pytest

from conftest import make_image
from faults import wait_until

MiB = 1 << 20
CONNECTIONS = 30
_CLOSED = re.compile(r"Connection closed: thread states released=(\d+) left=(\d+)")


def _closed_lines(server):
    return [(int(a), int(b)) for a, b in _CLOSED.findall(server.log())]


def _wait_closed(server, count):
    return wait_until(lambda: len(_closed_lines(server)) >= count and _closed_lines(server),
                      30, 0.02)


def _busy_connection(uri, seed):
    """Reads and writes with many requests in flight, so every worker thread serves some."""
    h = nbd.NBD()
    h.connect_uri(uri)
    data = bytes([seed % 251]) * 65536
    h.pwrite(data, seed * 65536)
    bufs = [nbd.Buffer(4096) for _ in range(32)]
    pending = [h.aio_pread(b, (i * 7919 % 256) * 4096) for i, b in enumerate(bufs)]
    while pending:
        h.poll(-1)
        pending = [c for c in pending if not h.aio_command_completed(c)]
    assert h.pread(65536, seed * 65536) == data
    h.flush()
    h.shutdown()


@pytest.mark.parametrize("threads", ["2", "8", "1"])
def test_thread_states_do_not_grow_with_connections(servers, tmp_path, threads):
    base = make_image(tmp_path / "base.img", 4 * MiB)
    srv = servers.overlay(tmp_path / "state", base=base, options=["--threads", threads])
    for i in range(CONNECTIONS):
        _busy_connection(srv.uri, i)
        # nbdkit closes a connection in its own thread: wait for it before the next
        # one opens, so that "left" never counts a live connection's kept states.
        lines = _wait_closed(srv, i + 1)
    released = [r for r, _ in lines]
    left = [n for _, n in lines]
    # The states were kept (else nothing was gained) and given back on close
    # (else the interpreter would hold about `threads` more after every connection).
    assert all(r >= 1 for r in released), lines
    assert max(left) - min(left) <= 2, lines
    # Every write of every connection is on the disk.
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for i in range(CONNECTIONS):
        assert h.pread(65536, i * 65536) == bytes([i % 251]) * 65536
    h.shutdown()
    assert srv.stop() == 0
