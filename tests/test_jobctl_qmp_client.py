"""jobctl's QMP client (over qemu.qmp) against a scripted server on a real Unix socket.

QMP servers end every message with a newline, and qemu.qmp reads lines, so
the script's chunks are whole lines, possibly split across writes.
"""

import json
import socket
import threading

import pytest

from jobctl.qmp_client import (
    ConnectionLost,
    NbdSocket,
    NotQMP,
    QMPClient,
    QMPError,
    ServerNotRunning,
    Timeout,
)

HANG_UP = object()
GREETING = {"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 0}}, "capabilities": []}}


class ScriptedServer:
    """Accepts one connection and answers requests with a per-command script.

    script maps a command name to a list of raw byte chunks to send back;
    b"{id}" in a chunk is replaced by the request's JSON-encoded id. A
    command without a script, or HANG_UP in one, makes the server hang up.
    """

    def __init__(self, path, script, greeting=None, split_greeting=False):
        self.path = str(path)
        self.script = script
        self.greeting = json.dumps(GREETING).encode() + b"\n" if greeting is None else greeting
        self.split_greeting = split_greeting
        self.requests = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            if self.split_greeting:
                half = len(self.greeting) // 2
                conn.sendall(self.greeting[:half])
                conn.sendall(self.greeting[half:])
            else:
                conn.sendall(self.greeting)
            for request in _requests(conn):
                self.requests.append(request)
                chunks = self.script.get(request["execute"])
                if chunks is None:
                    return          # hang up
                for chunk in chunks:
                    if chunk is HANG_UP:
                        return
                    if "id" in request:
                        chunk = chunk.replace(b"{id}", json.dumps(request["id"]).encode())
                    else:       # qemu.qmp negotiates without an id
                        chunk = chunk.replace(b', "id": {id}', b"")
                    conn.sendall(chunk)

    def close(self):
        self.listener.close()
        self.thread.join(timeout=5)


def _requests(conn):
    """The JSON objects a client sends (qemu.qmp ends them with no newline)."""
    decoder, buffered = json.JSONDecoder(), ""
    while True:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:    # the client left with our bytes unread
            return
        if not data:
            return
        buffered += data.decode()
        while buffered.strip():
            try:
                request, end = decoder.raw_decode(buffered.lstrip())
            except json.JSONDecodeError:
                break           # incomplete: read more
            buffered = buffered.lstrip()[end:]
            yield request


OK = [b'{"return": {}, "id": {id}}\n']


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "qmp.sock"


def serve(sock_path, script, **kwargs):
    script = dict({"qmp_capabilities": OK}, **script)
    return ScriptedServer(sock_path, script, **kwargs)


def test_execute_returns_the_return_value(sock_path):
    server = serve(sock_path, {"query-version": [b'{"return": {"qemu": 1}, "id": {id}}\n']})
    with QMPClient(str(sock_path)) as client:
        assert client.execute("query-version") == {"qemu": 1}
    server.close()


def test_negotiates_capabilities_first(sock_path):
    server = serve(sock_path, {"x": OK})
    with QMPClient(str(sock_path)) as client:
        client.execute("x", {"a": 1})
    server.close()
    assert [r["execute"] for r in server.requests] == ["qmp_capabilities", "x"]
    assert server.requests[1]["arguments"] == {"a": 1}


def test_error_reply_raises_with_class_and_desc(sock_path):
    server = serve(sock_path, {"block-job-pause": [
        b'{"error": {"class": "GenericError", "desc": "Job \'j\' in state \'concluded\' '
        b'cannot accept command verb \'pause\'"}, "id": {id}}\n']})
    with QMPClient(str(sock_path)) as client:
        with pytest.raises(QMPError) as info:
            client.execute("block-job-pause", {"device": "j"})
    server.close()
    assert info.value.cls == "GenericError"
    assert info.value.desc == "Job 'j' in state 'concluded' cannot accept command verb 'pause'"


def test_messages_split_across_writes_are_parsed(sock_path):
    server = serve(sock_path, {"q": [b'{"ret', b'urn": [1, "}{"], "id": {id}}\n']}, split_greeting=True)
    with QMPClient(str(sock_path)) as client:
        assert client.execute("q") == [1, "}{"]
    server.close()


def test_events_before_reply_are_buffered_in_order(sock_path):
    events = b''.join(
        b'{"event": "E%d", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}\n' % i
        for i in range(3))
    server = serve(sock_path, {"q": [events + b'{"return": 7, "id": {id}}\n']})
    with QMPClient(str(sock_path)) as client:
        assert client.execute("q") == 7
        names = [client.next_event(timeout=0)["event"] for _ in range(3)]
        assert client.next_event(timeout=0) is None
    server.close()
    assert names == ["E0", "E1", "E2"]


def test_next_event_waits_for_an_event_after_the_reply(sock_path):
    server = serve(sock_path, {"q": [b'{"return": {}, "id": {id}}\n',
                                     b'{"event": "LATE", "data": {"id": "j"}}\n']})
    with QMPClient(str(sock_path)) as client:
        client.execute("q")
        assert client.next_event(timeout=5)["event"] == "LATE"
    server.close()


def test_next_event_times_out_with_none(sock_path):
    server = serve(sock_path, {})
    with QMPClient(str(sock_path)) as client:
        assert client.next_event(timeout=0.1) is None
    server.close()


def test_reply_to_another_id_is_skipped(sock_path):
    server = serve(sock_path, {"q": [b'{"return": "stale", "id": "other"}\n{"return": "mine", "id": {id}}\n']})
    with QMPClient(str(sock_path)) as client:
        assert client.execute("q") == "mine"
    server.close()


def test_missing_socket_is_server_not_running(sock_path):
    with pytest.raises(ServerNotRunning, match="server not running"):
        QMPClient(str(sock_path)).connect()


def test_socket_without_listener_is_server_not_running(sock_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()        # bound but never listening: connect is refused
    with pytest.raises(ServerNotRunning, match="connection refused"):
        QMPClient(str(sock_path)).connect()


def test_server_hanging_up_is_connection_lost(sock_path):
    server = serve(sock_path, {})        # no script for "q": the server hangs up
    with QMPClient(str(sock_path)) as client:
        with pytest.raises(ConnectionLost):
            client.execute("q")
    server.close()


def test_missing_greeting_is_a_protocol_error(sock_path):
    server = serve(sock_path, {}, greeting=b'{"hello": 1}\n')
    with pytest.raises(NotQMP, match="greeting"):
        QMPClient(str(sock_path)).connect()
    server.close()


def test_silent_server_times_out(sock_path):
    server = serve(sock_path, {"q": []})
    with QMPClient(str(sock_path), timeout=0.2) as client:
        with pytest.raises(Timeout):
            client.execute("q")
    server.close()


def test_nbd_socket_is_named_as_such(sock_path):
    # An NBD server's newstyle handshake: magic, IHAVEOPT, handshake flags.
    server = serve(sock_path, {}, greeting=b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03")
    with pytest.raises(NbdSocket, match="that is an NBD socket, not a control socket"):
        QMPClient(str(sock_path), timeout=5).connect()
    server.close()


def test_events_sent_before_a_hang_up_are_delivered_then_connection_lost(sock_path):
    server = serve(sock_path, {"q": [b'{"return": {}, "id": {id}}\n',
                                     b'{"event": "LAST", "data": {}}\n', HANG_UP]})
    with QMPClient(str(sock_path)) as client:
        client.execute("q")
        assert client.next_event(timeout=None)["event"] == "LAST"
        with pytest.raises(ConnectionLost, match="connection closed by server"):
            client.next_event(timeout=None)     # returns at once, does not wait forever
    server.close()
