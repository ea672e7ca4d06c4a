"""A small synchronous QMP client over a Unix socket.

jobctl runs one command and exits, so a blocking client is all it needs: no
threads, no asyncio.  The client connects, reads the greeting, negotiates
capabilities, then sends commands one at a time.  Events that arrive while a
reply is awaited are buffered in arrival order and handed out by
`next_event`, so a caller that starts a job and then watches it misses
nothing that happened in between.

The incoming byte stream is parsed as a sequence of JSON values, not lines:
QMP does not promise a newline after each message.
"""

import collections
import errno
import itertools
import json
import logging
import os
import socket
import stat
import time

log = logging.getLogger(__name__)

_RECV_SIZE = 65536


class QMPClientError(Exception):
    """Base class of everything this client raises."""


class ServerNotRunning(QMPClientError):
    """The control socket does not exist or nobody listens on it."""

    def __init__(self, path, reason):
        super().__init__(f"cannot connect to {path}: {reason}")
        self.path = path
        self.reason = reason


class ConnectionLost(QMPClientError):
    """The server closed the connection or the socket failed mid-session."""


class ProtocolError(QMPClientError):
    """The server sent something that is not valid QMP."""


class Timeout(QMPClientError):
    """No reply (or greeting) arrived in time."""


class QMPError(QMPClientError):
    """An error reply: {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, cls, desc):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class JSONStreamDecoder:
    """Splits a byte stream into JSON values, whatever the line breaks.

    Bytes are fed as they arrive; complete values come out of `values()`.
    A value split across reads stays buffered until the rest arrives.
    QMP only ever sends objects, so a top-level value must be an object or
    an array; its end is found by tracking nesting outside of strings,
    which tells "not complete yet" from "malformed" without guessing.
    """

    def __init__(self):
        self._bytes = b""
        self._text = ""
        self._scan = 0          # how far self._text has been scanned
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, data):
        self._bytes += data
        # Decode only complete UTF-8 sequences; keep a split character for later.
        try:
            self._text += self._bytes.decode("utf-8")
            self._bytes = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                raise ProtocolError(f"invalid UTF-8 from server: {e}") from None
            self._text += self._bytes[:e.start].decode("utf-8")
            self._bytes = self._bytes[e.start:]

    def values(self):
        """Yield every complete JSON value buffered so far."""
        while True:
            end = self._find_end()
            if end is None:
                return
            chunk, self._text, self._scan = self._text[:end], self._text[end:], 0
            try:
                yield json.loads(chunk)
            except json.JSONDecodeError as e:
                raise ProtocolError(f"invalid JSON from server: {e}") from None

    def pending(self):
        """True when part of a value is buffered."""
        return bool(self._bytes or self._text.strip())

    def _find_end(self):
        """Return the index just past the first complete value, or None."""
        text = self._text
        if self._scan == 0:
            stripped = text.lstrip()
            self._text = text = stripped
            if not text:
                return None
            if text[0] not in "{[":
                raise ProtocolError(f"unexpected data from server: {text[:40]!r}")
        for i in range(self._scan, len(text)):
            c = text[i]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._scan = 0
                    return i + 1
        self._scan = len(text)
        return None


class QMPClient:
    """A blocking QMP session on a Unix socket.

    Use as a context manager, or call connect() and close().
    `timeout` bounds the wait for the greeting and for each reply
    (None waits forever).
    """

    def __init__(self, path, timeout=30.0):
        self.path = path
        self.timeout = timeout
        self.greeting = None
        self._sock = None
        self._decoder = JSONStreamDecoder()
        self._incoming = collections.deque()   # parsed values not yet consumed
        self._events = collections.deque()     # events seen while awaiting replies
        self._ids = itertools.count(1)

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        """Connect, read the greeting and negotiate capabilities."""
        self._sock = _connect_unix(self.path)
        try:
            self.greeting = self._read_value(self._deadline(self.timeout))
            if not isinstance(self.greeting, dict) or "QMP" not in self.greeting:
                raise ProtocolError(f"expected a QMP greeting, got {_short(self.greeting)}")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        log.debug("Connected path=%r version=%r", self.path,
                  self.greeting["QMP"].get("version"))

    def close(self):
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()

    def execute(self, command, arguments=None, timeout=...):
        """Run one command and return its "return" value.

        Raises QMPError with the server's class and desc on an error reply.
        Events arriving meanwhile are kept for next_event().
        """
        if timeout is ...:
            timeout = self.timeout
        request_id = f"jobctl-{next(self._ids)}"
        request = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        self._send(request)
        deadline = self._deadline(timeout)
        while True:
            message = self._read_value(deadline)
            if not isinstance(message, dict):
                raise ProtocolError(f"unexpected message {_short(message)}")
            if "event" in message:
                self._events.append(message)
                continue
            # A reply without an id answers a request the server could not
            # parse far enough to read the id: that can only be ours.
            if message.get("id", request_id) != request_id:
                log.debug("Dropping reply to another request message=%r", message)
                continue
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                raise QMPError(error.get("class", "GenericError"), error.get("desc", ""))
            raise ProtocolError(f"unexpected reply {_short(message)}")

    def next_event(self, timeout=None):
        """Return the next event, or None when none arrives within timeout.

        timeout=None waits forever; 0 only returns what is already here.
        Raises ConnectionLost if the server goes away.
        """
        if self._events:
            return self._events.popleft()
        deadline = self._deadline(timeout)
        while True:
            message = self._read_value(deadline, allow_timeout=True)
            if message is None:
                return None
            if isinstance(message, dict) and "event" in message:
                return message
            log.debug("Dropping unsolicited message=%r", message)

    def _send(self, message):
        data = json.dumps(message).encode("utf-8") + b"\n"
        log.debug("Send message=%s", data.decode("utf-8").rstrip())
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(f"connection to server lost: {e.strerror or e}") from None

    def _read_value(self, deadline, allow_timeout=False):
        """Return the next JSON value from the socket, reading as needed."""
        while not self._incoming:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if allow_timeout:
                    return None
                raise Timeout("timed out waiting for the server")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(_RECV_SIZE)
            except socket.timeout:
                continue
            except OSError as e:
                raise ConnectionLost(f"connection to server lost: {e.strerror or e}") from None
            if not data:
                raise ConnectionLost("connection closed by server")
            self._decoder.feed(data)
            self._incoming.extend(self._decoder.values())
        message = self._incoming.popleft()
        log.debug("Receive message=%s", json.dumps(message))
        return message

    @staticmethod
    def _deadline(timeout):
        return None if timeout is None else time.monotonic() + timeout


def _connect_unix(path):
    """Connect to a Unix socket, turning "nobody there" into ServerNotRunning."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ServerNotRunning(path, "server not running (no such socket)") from None
    except OSError as e:
        raise ServerNotRunning(path, e.strerror) from None
    if not stat.S_ISSOCK(mode):
        raise ServerNotRunning(path, "not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            raise ServerNotRunning(path, "server not running (connection refused)") from None
        raise ServerNotRunning(path, e.strerror or str(e)) from None
    return sock


def _short(value, limit=200):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
