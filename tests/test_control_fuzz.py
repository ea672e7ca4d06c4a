"""The control socket of a real nbdkit under abuse (issue 9 §4): a fuzz run with a
fixed seed, the connection limit, the descriptor reserve.  The disk keeps being
served throughout, and the control socket stays usable."""

import json
import queue
import socket
import threading
import time

from conftest import PLUGIN, Server
from qmp_fuzz import messages
from plugin.qmp.wire import StreamDecoder

MiB = 1 << 20
SEED = 20240501
COUNT = 3000
RSS_MARGIN_KIB = 8 * 1024       # measured: +0.8 MiB over 10,000, +3 MiB over 40,000 messages
TIMEOUT = 30


def vm_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class Session:
    """A raw QMP connection whose replies a thread collects (so the server never waits on us)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.replies = queue.Queue()
        self.seen = []                 # every message, for checks at the end
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        decoder = StreamDecoder(max_size=64 * MiB)
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                for msg in decoder.feed(data):
                    self.seen.append(msg)
                    self.replies.put(msg)
        except OSError:
            pass
        self.closed.set()

    def next(self, timeout=TIMEOUT):
        return self.replies.get(timeout=timeout)

    def send(self, data):
        self.sock.sendall(data)

    def call(self, name, marker, timeout=TIMEOUT):
        """Resynchronise (a reset byte), run name, wait for the reply carrying marker."""
        self.send(b"\x00" + json.dumps({"execute": name, "id": marker}).encode())
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, dict) and msg.get("id") == marker:
                return msg

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(TIMEOUT)


def negotiated(path):
    s = Session(path)
    assert "QMP" in s.next()
    s.send(b'{"execute": "qmp_capabilities"}')
    assert s.next() == {"return": {}}
    return s


def test_fuzzed_control_messages_leave_the_server_usable_and_rss_bounded(servers, tmp_path,
                                                                         connect):
    srv = servers.overlay(tmp_path / "ov", size="16M")
    h = connect(srv.uri)
    h.pwrite(b"\x5a" * 65536, 0)
    s = negotiated(srv.control)
    stream = messages(SEED, COUNT)
    for _ in range(300):                       # warm-up: first allocations, imports
        s.send(next(stream))
    assert "return" in s.call("query-version", "warm")
    before = vm_rss_kib(srv.pid)
    for i, msg in enumerate(stream, 1):
        s.send(msg)
        if i % 500 == 0:
            reply = s.call("query-version", "check-%d" % i)
            assert reply["return"]["package"], reply
    after = vm_rss_kib(srv.pid)
    assert after - before < RSS_MARGIN_KIB, (before, after)
    assert s.call("query-block-jobs", "jobs") == {"return": [], "id": "jobs"}
    assert s.call("query-status", "status")["return"]["running"] is True
    s.close()
    descs = [m["error"]["desc"] for m in s.seen if isinstance(m, dict) and "error" in m]
    assert len(descs) > COUNT // 2
    assert any("out of range" in d for d in descs)            # the huge numbers were answered
    assert any("nesting depth" in d for d in descs)
    assert not [d for d in descs if "Exceeds" in d or "int_max_str_digits" in d
                or "Traceback" in d or "\n" in d]
    assert srv.proc.poll() is None
    assert h.pread(65536, 0) == b"\x5a" * 65536
    fresh = negotiated(srv.control)             # a new client is served too
    assert "return" in fresh.call("query-version", "fresh")
    fresh.close()
    h.shutdown()
    log = srv.log()
    assert srv.stop() == 0
    assert "Traceback" not in log and "Exceeds the limit" not in log


def test_the_65th_control_connection_is_refused_and_nbd_clients_are_still_served(
        servers, tmp_path, connect):
    srv = servers.overlay(tmp_path / "ov", size="16M")
    sessions = [Session(srv.control) for _ in range(64)]
    try:
        assert all("QMP" in s.next() for s in sessions)
        extra = Session(srv.control)
        assert extra.next() == {"error": {"class": "GenericError",
                                          "desc": "too many control connections (64)"}}
        assert extra.closed.wait(TIMEOUT)
        extra.close()
        handles = [connect(srv.uri) for _ in range(8)]
        handles[0].pwrite(b"\x11" * 4096, 0)
        assert all(h.pread(4096, 0) == b"\x11" * 4096 for h in handles)
        sessions.pop().close()
        # The server frees the slot once it has seen the close: the next greeting comes then.
        deadline = time.monotonic() + TIMEOUT
        while True:
            again = Session(srv.control)
            first = again.next()
            if "QMP" in first:
                break
            again.close()
            assert time.monotonic() < deadline, first
        again.close()
        for h in handles:
            h.shutdown()
    finally:
        for s in sessions:
            s.close()
    assert "QMP client refused" in srv.log()


def test_control_connections_leave_descriptors_for_nbd_clients(servers, tmp_path, connect):
    """With RLIMIT_NOFILE 170, control connections are refused well before 64, and NBD
    clients still connect (no 'Too many open files' anywhere)."""
    sock, log = tmp_path / "fd.sock", tmp_path / "fd.log"
    control = tmp_path / "ov" / "control.sock"
    argv = ["prlimit", "--nofile=170:170", "nbdkit", "-f", "-v", "-U", str(sock), "python",
            str(PLUGIN), "overlay=%s" % (tmp_path / "ov"), "size=16M"]
    srv = Server(argv, sock, log, control=str(control))
    servers.started.append(srv)
    srv.wait_ready()
    sessions = []
    try:
        while True:
            s = Session(control)
            first = s.next()
            if "QMP" not in first:
                break
            sessions.append(s)
            assert len(sessions) < 64, "no descriptor reserve"
        assert "too few file descriptors left" in first["error"]["desc"]
        s.close()
        handles = [connect(srv.uri) for _ in range(20)]
        assert all(h.pread(512, 0) == bytes(512) for h in handles)
        for h in handles:
            h.shutdown()
    finally:
        for s in sessions:
            s.close()
    assert "Too many open files" not in srv.log()
