"""jobctl's QMP session: a thin layer over qemu.qmp's synchronous client.

The protocol (framing, JSON, ids, capabilities negotiation, event queue)
is qemu.qmp's `qemu.qmp.legacy.QEMUMonitorProtocol`. This module only adds
what a one-shot command-line tool needs on top:

- a connection made here, so "nobody there" (no socket, refused) and "not
  a QMP server at all" (an NBD socket, which greets with NBDMAGIC) become
  clear errors before qemu.qmp sees a byte;
- timeouts on the greeting and on every reply;
- `next_event(timeout)` that also returns when the server goes away, where
  the legacy `pull_event` would wait forever;
- qemu.qmp's many failure types sorted into the few jobctl reports
  (ServerNotRunning, ConnectionLost, NotQMP, Timeout).

An error reply raises qemu.qmp's own `ExecuteError` (exported here as
`QMPError`), with two attributes added for convenience: `cls` (the QMP
error class) and `desc` (the server's text).
"""

import asyncio
import errno
import json
import logging
import os
import socket
import stat

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Runstate, StateError
from qemu.qmp import QMPError as _LibraryError
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.qmp_client import GreetingError, NegotiationError

log = logging.getLogger(__name__)

# An error reply from the server ({"error": {"class": ..., "desc": ...}}).
QMPError = ExecuteError

# The first bytes an NBD server sends (old and new style handshakes alike).
NBD_MAGIC = b"NBDMAGIC"


class ConnectionProblem(Exception):
    """Base of the failures that mean "cannot talk to the control server"."""


class ServerNotRunning(ConnectionProblem):
    """The control socket does not exist or nobody listens on it."""

    def __init__(self, path, reason):
        super().__init__(f"cannot connect to {path}: {reason}")
        self.path = path
        self.reason = reason


class ConnectionLost(ConnectionProblem):
    """The server closed the connection or the socket failed mid-session."""


class NotQMP(ConnectionProblem):
    """Something answers on the socket, but it does not speak QMP."""


class NbdSocket(NotQMP):
    """The socket is an NBD server's (it sent NBDMAGIC), not a control socket."""

    def __init__(self, path):
        super().__init__(f"cannot connect to {path}: that is an NBD socket, not a control socket "
                         "(the control socket is STATE_DIR/control.sock, or the plugin's control= path)")
        self.path = path


class Timeout(Exception):
    """No reply (or greeting) arrived in time."""


class _Monitor(QEMUMonitorProtocol):
    """QEMUMonitorProtocol with a bounded connect and a disconnect-aware event wait.

    Both use the same two pieces the legacy class is built from: its event
    loop runner (`_sync`) and its asynchronous `QMPClient` (`_qmp`).
    """

    def _sync(self, future, timeout=None):
        """The legacy runner, plus: a Ctrl-C while it runs cancels its task.

        Otherwise the interrupted task would wake up during close() and
        die there with a "Task exception was never retrieved" report.
        """
        task = asyncio.ensure_future(asyncio.wait_for(future, timeout=timeout), loop=self._aloop)
        try:
            return self._aloop.run_until_complete(task)
        except BaseException:
            if not task.done():
                task.cancel()
                try:
                    self._aloop.run_until_complete(task)
                except BaseException:       # its cancellation, or what it died of meanwhile
                    pass
            raise

    def connect_within(self, timeout):
        """connect() (greeting + negotiation), giving up after timeout seconds."""
        self._qmp.await_greeting = True
        self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout)
        return self._get_greeting()

    def next_event(self, timeout):
        """The next event, or None after timeout seconds (None: no limit).

        Events already received come first; once they are used up, a closed
        connection raises EOFError instead of waiting.
        """
        return self._sync(self._next_event(timeout))

    async def _next_event(self, timeout):
        qmp = self._qmp
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        get = asyncio.ensure_future(qmp.events.get())
        try:
            while True:
                await asyncio.sleep(0)          # let the reader deliver what has arrived
                if get.done():
                    return dict(get.result())
                if qmp.runstate != Runstate.RUNNING:
                    raise EOFError("disconnected")
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return None
                # runstate_changed() only sees changes made while it waits:
                # let it start waiting, then look at the state once more.
                changed = asyncio.ensure_future(qmp.runstate_changed())
                try:
                    await asyncio.sleep(0)
                    if qmp.runstate == Runstate.RUNNING and not get.done():
                        await asyncio.wait({get, changed}, timeout=remaining,
                                           return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not changed.done():
                        changed.cancel()
        finally:
            # A cancelled Queue.get leaves its item in the queue: nothing is lost.
            if not get.done():
                get.cancel()


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
        self._monitor = None

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        """Connect, read the greeting and negotiate capabilities."""
        sock = _connect_unix(self.path)
        try:
            _check_not_nbd(sock, self.path, self.timeout)
            self._monitor = _Monitor(sock, nickname="jobctl")
            self.greeting = self._monitor.connect_within(self.timeout)
        except ConnectError as e:
            self.close()
            sock.close()
            raise _connect_failure(e.exc) from None
        except asyncio.TimeoutError:
            self.close()
            sock.close()
            raise Timeout("timed out waiting for the server's greeting") from None
        except BaseException:
            self.close()
            sock.close()
            raise
        log.debug("Connected path=%r version=%s", self.path,
                  json.dumps(self.greeting["QMP"].get("version")))

    def close(self):
        """Disconnect; an error the session died of was reported already."""
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            try:
                monitor.close()
            except Exception as e:      # the reason of a loss, already turned into ours
                log.debug("Closed after error=%r", e)

    def execute(self, command, arguments=None, timeout=...):
        """Run one command and return its "return" value.

        Raises QMPError (qemu.qmp's ExecuteError, with .cls and .desc) on an
        error reply. Events arriving meanwhile are kept for next_event().
        """
        if timeout is ...:
            timeout = self.timeout
        log.debug("Execute command=%s arguments=%s", command, json.dumps(arguments or {}))
        self._monitor.settimeout(timeout)
        try:
            value = self._monitor.cmd(command, **(arguments or {}))
        except ExecuteError as e:
            e.cls, e.desc = e.error_class, str(e)
            log.debug("Error command=%s class=%s desc=%r", command, e.cls, e.desc)
            raise
        except asyncio.TimeoutError:
            raise Timeout("timed out waiting for the server") from None
        except (ExecInterruptedError, StateError, EOFError, OSError):
            self._raise_lost()
        except _LibraryError as e:
            raise NotQMP(f"invalid reply from server: {e}") from None
        log.debug("Return command=%s value=%s", command, json.dumps(value))
        return value

    def next_event(self, timeout=None):
        """Return the next event, or None when none arrives within timeout.

        timeout=None waits forever; 0 only returns what is already here.
        Raises ConnectionLost if the server goes away.
        """
        try:
            event = self._monitor.next_event(timeout)
        except (EOFError, OSError, StateError):
            self._raise_lost()
        if event is not None:
            log.debug("Event %s", json.dumps(event))
        return event

    def _raise_lost(self):
        """The session ended under us: say why, from what qemu.qmp saw."""
        monitor, self._monitor = self._monitor, None
        try:
            monitor.close()
        except EOFError:
            raise ConnectionLost("connection closed by server") from None
        except OSError as e:
            raise ConnectionLost(f"connection to server lost: {e.strerror or e}") from None
        except _LibraryError as e:
            raise NotQMP(f"invalid QMP from server: {e}") from None
        raise ConnectionLost("connection closed by server")


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


def _check_not_nbd(sock, path, timeout):
    """Look at the server's first bytes (without taking them) for NBD's magic.

    Both QMP and NBD servers speak first, so this costs no round trip.
    """
    sock.settimeout(timeout)
    try:
        first = sock.recv(len(NBD_MAGIC), socket.MSG_PEEK)
    except socket.timeout:
        raise Timeout("timed out waiting for the server's greeting") from None
    except OSError as e:
        raise ConnectionLost(f"connection to server lost: {e.strerror or e}") from None
    finally:
        sock.settimeout(None)
    if not first:
        raise ConnectionLost("connection closed by server before its greeting")
    if first[:3] == NBD_MAGIC[:3] and NBD_MAGIC.startswith(first):
        raise NbdSocket(path)


def _connect_failure(cause):
    """What a failed qemu.qmp connect() means to the user."""
    if isinstance(cause, GreetingError):
        return NotQMP(f"expected a QMP greeting, got something else ({cause.exc})")
    if isinstance(cause, NegotiationError):
        return NotQMP(f"QMP capabilities negotiation failed ({cause.exc})")
    if isinstance(cause, EOFError):
        return ConnectionLost("connection closed by server")
    if isinstance(cause, OSError):
        return ConnectionLost(f"connection to server lost: {cause.strerror or cause}")
    return NotQMP(f"invalid QMP from server: {cause}")
