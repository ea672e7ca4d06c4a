"""ControlServer over a real Unix socket: QMP sessions, events, robustness."""

import asyncio
import collections
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from plugin.qmp.server import ControlServer
from plugin.qmp.events import EventBus
from plugin.core.errors import CommandError
from plugin.qmp.dispatch import CommandRegistry, register_builtin_commands
from plugin.qmp.wire import StreamDecoder

TIMEOUT = 10


class RawClient:
    """A minimal blocking QMP peer that sends exactly the bytes it is given."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.decoder = StreamDecoder(max_size=64 * 1024 * 1024)
        self.pending = collections.deque()

    def recv(self):
        """The next message from the server; EOFError once it closed."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    def send(self, msg):
        self.sock.sendall(msg if isinstance(msg, bytes) else json.dumps(msg).encode())

    def execute(self, name, arguments=None, **extra):
        msg = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(msg)
        return self.recv()

    def negotiate(self):
        self.recv()  # greeting
        reply = self.execute("qmp_capabilities")
        assert reply == {"return": {}}
        return self

    def close(self):
        self.sock.close()


class Env:
    """A started server with test commands, plus factories for clients."""

    def __init__(self, tmp_path, **kwargs):
        self.path = tmp_path / "ctl.sock"
        self.bus = EventBus()
        self.registry = CommandRegistry()
        register_builtin_commands(self.registry, version=(9, 1, 0), package="test-pkg")
        self.calls = []
        self.registry.register("echo", self._echo, {"*text": "str"})
        self.registry.register("emit", self._emit, {"name": "str", "*count": "int"})
        self.registry.register("crash", self._crash)
        self.registry.register("refuse", self._refuse)
        self.registry.register("unserialisable", lambda: {"x": object()})
        self.server = ControlServer(self.path, self.registry, self.bus,
                                    greeting_version=(9, 1, 0), package="test-pkg", **kwargs)
        self.clients = []

    def _echo(self, **kwargs):
        self.calls.append(kwargs)
        return {"text": kwargs.get("text", "")}

    def _emit(self, name, count=1):
        for i in range(count):
            self.bus.emit(name, {"i": i})

    def _crash(self):
        raise RuntimeError("kaboom")

    def _refuse(self):
        raise CommandError("Job 'j' not found", "DeviceNotActive")

    def client(self, negotiate=True):
        c = RawClient(self.path)
        self.clients.append(c)
        return c.negotiate() if negotiate else c

    def close(self):
        for c in self.clients:
            c.close()
        self.server.stop()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.server.start()
    yield e
    e.close()


def events_of(client, count):
    out = []
    while len(out) < count:
        msg = client.recv()
        if "event" in msg:
            out.append(msg)
    return out


# -- session basics ----------------------------------------------------------

def test_greeting_has_qemu_shape(env):
    assert env.client(negotiate=False).recv() == {"QMP": {
        "version": {"qemu": {"major": 9, "minor": 1, "micro": 0}, "package": "test-pkg"},
        "capabilities": []}}


def test_command_before_negotiation_is_refused(env):
    c = env.client(negotiate=False)
    c.recv()
    assert c.execute("query-version") == {"error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}


def test_negotiation_works_after_a_refused_command(env):
    c = env.client(negotiate=False)
    c.recv()
    c.execute("echo")
    assert c.execute("qmp_capabilities") == {"return": {}}


def test_second_negotiation_is_refused(env):
    c = env.client()
    assert c.execute("qmp_capabilities") == {"error": {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}}


def test_query_version_matches_greeting(env):
    assert env.client().execute("query-version")["return"] == {
        "qemu": {"major": 9, "minor": 1, "micro": 0}, "package": "test-pkg"}


@pytest.mark.parametrize("ident", ["abc", 17, {"n": [1, "x"]}, None])
def test_reply_echoes_id(env, ident):
    assert env.client().execute("echo", {"text": "hi"}, id=ident) == \
        {"return": {"text": "hi"}, "id": ident}


def test_error_reply_echoes_id(env):
    assert env.client().execute("nope", id="q1") == {"error": {
        "class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": "q1"}


def test_envelope_error_echoes_id(env):
    c = env.client()
    c.send({"execute": "echo", "bogus": 1, "id": 5})
    assert c.recv() == {"error": {
        "class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}, "id": 5}


def test_bad_arguments_are_rejected_without_calling_the_handler(env):
    reply = env.client().execute("echo", {"text": 5})
    assert (reply, env.calls) == (
        {"error": {"class": "GenericError", "desc": "Parameter 'text' expects str"}}, [])


def test_handler_qmp_error_keeps_its_class(env):
    assert env.client().execute("refuse") == {"error": {
        "class": "DeviceNotActive", "desc": "Job 'j' not found"}}


def test_handler_exception_becomes_generic_error(env):
    assert env.client().execute("crash") == {"error": {"class": "GenericError", "desc": "kaboom"}}


def test_server_survives_handler_exception(env):
    c = env.client()
    c.execute("crash")
    assert c.execute("echo", {"text": "still"}) == {"return": {"text": "still"}}


def test_unserialisable_result_becomes_generic_error(env):
    reply = env.client().execute("unserialisable", id=1)
    assert (reply["error"]["class"], reply["id"]) == ("GenericError", 1)


# -- framing over the socket ---------------------------------------------------

def test_malformed_json_is_answered_and_connection_stays_usable(env):
    c = env.client()
    c.send(b'{"execute": }')
    error = c.recv()
    assert error["error"]["class"] == "GenericError" and "id" not in error
    assert c.execute("echo", {"text": "ok"}) == {"return": {"text": "ok"}}


def test_non_object_is_answered_with_qemu_text(env):
    c = env.client()
    c.send(b"[1, 2]")
    assert c.recv() == {"error": {"class": "GenericError",
                                  "desc": "QMP input must be a JSON object"}}


def test_oversized_message_is_answered_and_connection_stays_usable(env):
    c = env.client()
    c.send(b'{"execute": "echo", "arguments": {"text": "' + b"a" * (2 << 20) + b'"}}')
    assert "size limit" in c.recv()["error"]["desc"]
    assert c.execute("echo", {"text": "ok"}) == {"return": {"text": "ok"}}


def test_message_split_across_sends_without_newline(env):
    c = env.client()
    raw = json.dumps({"execute": "echo", "arguments": {"text": "split"}, "id": 1}).encode()
    for i in range(len(raw)):
        c.send(raw[i:i + 1])
    assert c.recv() == {"return": {"text": "split"}, "id": 1}


def test_several_messages_in_one_send_are_answered_in_order(env):
    c = env.client()
    c.send(b"".join(json.dumps({"execute": "echo", "id": i}).encode() for i in range(5)))
    assert [c.recv()["id"] for _ in range(5)] == list(range(5))


def test_replies_end_with_crlf(env):
    c = env.client(negotiate=False)
    assert c.sock.recv(65536).endswith(b"}\r\n")


def test_half_closed_client_still_gets_its_reply(env):
    c = env.client()
    c.send({"execute": "echo", "arguments": {"text": "bye"}})
    c.sock.shutdown(socket.SHUT_WR)
    assert (c.recv(), c.sock.recv(1)) == ({"return": {"text": "bye"}}, b"")


# -- events --------------------------------------------------------------------

def test_events_are_not_sent_before_negotiation(env):
    c = env.client(negotiate=False)
    c.recv()
    env.bus.emit("EARLY")
    c.execute("qmp_capabilities")
    env.bus.emit("LATE")
    assert c.recv()["event"] == "LATE"


def test_event_emitted_by_a_command_precedes_its_reply(env):
    c = env.client()
    c.send({"execute": "emit", "arguments": {"name": "DURING"}, "id": 1})
    assert [c.recv().get("event"), c.recv()] == ["DURING", {"return": {}, "id": 1}]


def test_event_has_qmp_shape_on_the_wire(env):
    c = env.client()
    env.bus.emit("BLOCK_JOB_READY", {"device": "d"})
    event = c.recv()
    assert (event["event"], event["data"], sorted(event["timestamp"])) == \
        ("BLOCK_JOB_READY", {"device": "d"}, ["microseconds", "seconds"])


def test_two_clients_both_get_all_events_in_order(env):
    a, b = env.client(), env.client()
    for i in range(200):
        env.bus.emit("E", {"i": i})
    assert [e["data"]["i"] for e in events_of(a, 200)] == list(range(200))
    assert [e["data"]["i"] for e in events_of(b, 200)] == list(range(200))


def test_events_from_another_thread_interleave_with_replies(env):
    c = env.client()
    emitter = threading.Thread(target=lambda: [env.bus.emit("E", {"i": i}) for i in range(300)])
    emitter.start()
    replies = [c.execute("echo", {"text": str(n)}) for n in range(20)]
    emitter.join()
    got = [r for r in replies if "event" not in r]
    events = [r for r in replies if "event" in r]
    # Drain whatever is left; every command got its reply, events kept order.
    while len(got) < 20 or len(events) < 300:
        msg = c.recv()
        (events if "event" in msg else got).append(msg)
    assert [e["data"]["i"] for e in events] == list(range(300))


def test_slow_reader_does_not_block_emit_or_other_clients(tmp_path):
    e = Env(tmp_path, max_output=64 * 1024)
    e.server.start()
    try:
        e.client()  # negotiated, never reads
        live = e.client()
        received = []
        reader = threading.Thread(target=lambda: received.extend(events_of(live, 5000)))
        reader.start()
        start = time.monotonic()
        for i in range(5000):
            e.bus.emit("E", {"i": i, "pad": "x" * 300})
        emit_time = time.monotonic() - start
        reader.join(TIMEOUT)
        assert emit_time < 2
        assert [ev["data"]["i"] for ev in received] == list(range(5000))
    finally:
        e.close()


def test_slow_reader_is_disconnected_and_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="plugin.qmp.server")
    e = Env(tmp_path, max_output=64 * 1024, event_queue=500)
    e.server.start()
    try:
        stuck = e.client()
        for i in range(5000):
            e.bus.emit("E", {"i": i, "pad": "x" * 300})
        count = 0
        with pytest.raises(EOFError):
            while True:
                stuck.recv()
                count += 1
        assert count < 5000
        assert "reason=event-queue-overflow" in caplog.text
    finally:
        e.close()


def test_client_sending_without_reading_is_throttled_not_dropped(tmp_path):
    e = Env(tmp_path, max_output=64 * 1024)
    e.server.start()
    try:
        c = e.client()
        request = b"".join(
            json.dumps({"execute": "echo", "arguments": {"text": "y" * 1000}, "id": i}).encode()
            for i in range(3000))
        sender = threading.Thread(target=c.send, args=(request,))
        sender.start()
        time.sleep(0.2)  # let the server's output buffer fill up
        ids = [c.recv()["id"] for _ in range(3000)]
        sender.join(TIMEOUT)
        assert ids == list(range(3000))
    finally:
        e.close()


def test_client_that_vanishes_does_not_disturb_others(env):
    gone, stays = env.client(), env.client()
    gone.send({"execute": "echo"})
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    gone.close()  # linger 0: the server sees ECONNRESET or EOF
    env.bus.emit("AFTER")
    assert stays.recv()["event"] == "AFTER"


# -- lifecycle -------------------------------------------------------------------

def test_socket_mode_is_0600(env):
    assert stat.S_IMODE(os.stat(env.path).st_mode) == 0o600


def test_stop_returns_promptly_with_clients_connected(env):
    env.client()
    env.client(negotiate=False)
    start = time.monotonic()
    env.server.stop()
    assert time.monotonic() - start < 1


def test_stop_closes_client_connections(env):
    c = env.client()
    env.server.stop()
    with pytest.raises(EOFError):
        c.recv()


def test_stop_removes_the_socket_file(env):
    env.server.stop()
    assert not env.path.exists()


def test_stop_is_idempotent(env):
    env.server.stop()
    env.server.stop()
    assert not env.server._thread.is_alive()


def test_stop_before_start_does_nothing(tmp_path):
    e = Env(tmp_path)
    e.server.stop()
    assert not e.path.exists()


def test_stale_socket_file_is_replaced(tmp_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "ctl.sock"))
    stale.close()  # the file stays, nobody listens
    e = Env(tmp_path)
    e.server.start()
    try:
        assert "QMP" in e.client(negotiate=False).recv()
    finally:
        e.close()


def test_live_socket_is_not_stolen(env, tmp_path):
    other = ControlServer(env.path, env.registry, env.bus)
    with pytest.raises(OSError):
        other.start()


def test_regular_file_at_socket_path_is_not_removed(tmp_path):
    (tmp_path / "ctl.sock").write_text("precious")
    e = Env(tmp_path)
    with pytest.raises(FileExistsError):
        e.server.start()


def test_registry_without_builtins_is_refused(tmp_path):
    with pytest.raises(ValueError):
        ControlServer(tmp_path / "ctl.sock", CommandRegistry(), EventBus())


# -- a real QMP client -------------------------------------------------------------

def test_qemu_qmp_client_works_unchanged(env):
    from qemu.qmp import QMPClient

    async def session():
        client = QMPClient("test")
        await client.connect(str(env.path))
        try:
            version = await client.execute("query-version")
            echoed = await client.execute("echo", {"text": "hello"})
            with client.listener() as listener:
                await client.execute("emit", {"name": "TEST_EVENT"})
                event = await asyncio.wait_for(listener.get(), TIMEOUT)
        finally:
            await client.disconnect()
        return version["qemu"], echoed, event["event"], event["data"]

    result = asyncio.run(asyncio.wait_for(session(), 2 * TIMEOUT))
    assert result == ({"major": 9, "minor": 1, "micro": 0}, {"text": "hello"},
                      "TEST_EVENT", {"i": 0})


def test_qemu_qmp_client_sees_command_errors(env):
    from qemu.qmp import ExecuteError, QMPClient

    async def session():
        client = QMPClient("test")
        await client.connect(str(env.path))
        try:
            with pytest.raises(ExecuteError) as info:
                await client.execute("echo", {"text": 1})
            after = await client.execute("echo", {"text": "ok"})
        finally:
            await client.disconnect()
        return info.value.error_class, after

    assert asyncio.run(asyncio.wait_for(session(), 2 * TIMEOUT)) == \
        ("GenericError", {"text": "ok"})


SERVER_WITH_FEW_FDS = r"""
import os, resource, sys, time
from plugin.qmp.server import ControlServer
from plugin.qmp.events import EventBus
from plugin.qmp.dispatch import CommandRegistry, register_builtin_commands
registry = CommandRegistry()
register_builtin_commands(registry)
server = ControlServer(sys.argv[1], registry, EventBus(), fd_reserve=0)  # test EMFILE itself
server.start()
spare = int(sys.argv[2])
in_use = len(os.listdir("/proc/self/fd")) - 1
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print("ready", flush=True)
sys.stdin.read()
server.stop()
"""


def test_server_recovers_when_out_of_file_descriptors(tmp_path):
    path = tmp_path / "ctl.sock"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", SERVER_WITH_FEW_FDS, str(path), "2"],
                            cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        served = [RawClient(path) for _ in range(2)]
        assert all("QMP" in c.recv() for c in served)
        waiting = RawClient(path)  # queued: the server cannot accept it yet
        waiting.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            waiting.recv()
        served[0].close()
        waiting.sock.settimeout(TIMEOUT)
        assert "QMP" in waiting.recv()
    finally:
        proc.stdin.close()
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert b"QMP accept failed" in proc.stderr.read()
