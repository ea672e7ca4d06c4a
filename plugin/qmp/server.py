"""QMP control server: the listening socket and the selector loop, one thread.

The control protocol is layered as ``qemu.qmp`` layers it: ``wire`` frames
bytes into messages, ``session`` holds the QMP session rules (greeting,
capabilities negotiation, one message -> one reply, event order),
``dispatch`` checks and runs commands, ``events`` carries events.  This
module owns the sockets: who may connect (peer uid, how many at once and
which idle one makes room, descriptors kept for NBD), the loop,
connections abandoned in the middle of a message, and teardown;
``connection`` does one client's I/O, buffers and back-pressure, and
``listener`` the socket file and what the system says about a peer.

Threading: ``start()`` starts ONE thread running a ``selectors`` loop over
the listening socket, every client, and a socketpair used to wake the loop
when events arrive or on ``stop()``.  Command handlers run on that thread
(they are quick by contract) and never see a socket.  Nothing here ever
blocks on a client, and ``EventBus.emit()`` never waits for us.

Output, per client: events move from the client's bounded subscription
into its output buffer only while that holds less than ``max_output``
bytes, so a slow reader's backlog stays in its subscription queue; when
that queue overflows (``event_queue`` events behind) the client has lost
events and is disconnected with a log line, others are unaffected.  While
the output buffer is full the client's requests are not read.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time

from ..core.threads import Thread
from .connection import Connection
from .listener import bind_socket, free_descriptors, peer_allowed, unlink_socket
from .session import SessionRules, refusal

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_EVENT_QUEUE = 10_000
# After accept() fails for lack of resources (EMFILE...), the listener stays
# readable; ignore it this long instead of spinning.
_ACCEPT_BACKOFF = 0.5
# Control connections served at once.  At the limit, a new connection evicts
# the one idle longest (never negotiated first) if it has sent nothing for
# EVICT_IDLE_AFTER seconds; otherwise it is answered with an error and closed.
DEFAULT_MAX_CLIENTS = 64
DEFAULT_EVICT_IDLE_AFTER = 10.0
# A message left unfinished this long (nothing received since) is abandoned:
# the connection is dropped and the partial message (up to 1 MiB) freed.
DEFAULT_PARTIAL_TIMEOUT = 10.0
# File descriptors kept free for nbdkit's NBD clients: a control connection is
# refused when fewer than this many would remain under RLIMIT_NOFILE.
DEFAULT_FD_RESERVE = 128
# A condition that repeats (refusals, accept failures) is logged once per interval.
_LOG_INTERVAL = 60.0

_LISTENER = object()
_WAKER = object()


class ControlServer:
    """Serves QMP on the Unix socket ``path``; see the module docstring."""

    def __init__(self, path, registry, bus, greeting_version=(0, 1, 0),
                 package: str = "overlay-nbd", max_output: int = DEFAULT_MAX_OUTPUT,
                 event_queue: int = DEFAULT_EVENT_QUEUE,
                 max_clients: int = DEFAULT_MAX_CLIENTS, fd_reserve: int = DEFAULT_FD_RESERVE,
                 evict_idle_after: float = DEFAULT_EVICT_IDLE_AFTER,
                 partial_timeout: float = DEFAULT_PARTIAL_TIMEOUT, clock=time.monotonic):
        self._rules = SessionRules(registry, bus, greeting_version, package, event_queue)
        self.path = os.fspath(path)
        self.registry = registry
        self.bus = bus
        self.max_output = max_output
        self.event_queue = event_queue
        self.max_clients = max_clients
        self.fd_reserve = fd_reserve
        self.evict_idle_after = evict_idle_after
        self.partial_timeout = partial_timeout
        self._clock = clock         # idle times (tests step it)
        self._quiet = _OncePerInterval(_LOG_INTERVAL)
        self._lock = threading.Lock()
        self._thread = None
        self._stopping = False
        self._wake_pending = False
        self._clients: dict[int, Connection] = {}
        self._next_client = 1
        self._listener = None
        self._socket_ino = None
        self._selector = None
        self._wake_r = self._wake_w = None
        self._accept_resume_at = None
        self._uid = os.getuid()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Create the socket (mode 0600) and start the server thread."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("control server already started")
            listener, self._socket_ino = bind_socket(self.path)
            try:
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                self._selector = selectors.DefaultSelector()
                self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
                self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKER)
            except BaseException:
                listener.close()
                unlink_socket(self.path, self._socket_ino)
                self._close_waker()
                raise
            self._listener = listener
            self._thread = Thread(target=self._run, name="qmp-control", daemon=True)
            self._thread.start()
        log.info("QMP control server listening path=%s", self.path)

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the socket, join the thread.  Idempotent."""
        with self._lock:
            thread = self._thread
            if thread is None or self._stopping:
                already = True
            else:
                already = False
                self._stopping = True
        if thread is None:
            return
        if not already:
            self._send_wake()
        if thread is threading.current_thread():
            return  # called from a command handler: the loop exits after it
        thread.join(timeout)
        if thread.is_alive():
            log.warning("QMP control thread did not stop timeout=%s", timeout)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- wake-up -------------------------------------------------------------

    def _notify(self) -> None:
        """Subscription callback (emitting thread): wake the loop, once."""
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._send_wake()

    def _send_wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError, AttributeError):
            # Full means a wake-up is already pending; closed means stopped.
            pass

    def _consume_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            self._wake_pending = False

    # -- the loop ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._maybe_resume_accept()
                timeout = self._drop_abandoned()
                if self._accept_resume_at is not None:
                    resume = max(0.0, self._accept_resume_at - time.monotonic())
                    timeout = resume if timeout is None else min(timeout, resume)
                for key, mask in self._selector.select(timeout):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKER:
                        self._consume_wake()
                    else:
                        self._service(key.data, mask)
                    if self._stopping:
                        break
                for client in list(self._clients.values()):
                    client.session.pump()
        except Exception:
            log.exception("QMP control loop failed path=%s", self.path)
        finally:
            self._shutdown()

    def _service(self, client: Connection, mask: int) -> None:
        if client.closed:
            return
        try:
            if mask & selectors.EVENT_READ:
                client.read()
            if mask & selectors.EVENT_WRITE and not client.closed:
                client.flush()
                client.session.pump()
        except Exception:
            # A bug while serving one client must not take the others down.
            log.exception("QMP client failed client=%d", client.number)
            client.close("internal-error")

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                # EMFILE and friends: keep serving the clients we have and
                # retry later, rather than spin on a readable listener.
                self._quiet.log(logging.WARNING, "accept-failed",
                                "QMP accept failed error=%s retry_in=%s", err, _ACCEPT_BACKOFF)
                self._selector.unregister(self._listener)
                self._accept_resume_at = time.monotonic() + _ACCEPT_BACKOFF
                return
            if not peer_allowed(sock, self._uid):
                continue
            refusal = self._refusal()
            if refusal is not None:
                self._refuse(sock, refusal)
                continue
            client = Connection(sock, self._next_client, self._selector, self.max_output,
                                self._forget, self._clock)
            self._next_client += 1
            self._clients[client.number] = client
            log.info("QMP client connected client=%d", client.number)
            client.session = self._rules.open(client.number, client, self._notify)

    def _refusal(self):
        """Why a new control connection cannot be served now, or None."""
        if len(self._clients) >= self.max_clients and not self._evict_idle():
            return "too many control connections (%d)" % self.max_clients
        free = free_descriptors()
        if free is not None and free < self.fd_reserve:
            return ("too few file descriptors left (%d free, %d kept for NBD clients)"
                    % (free, self.fd_reserve))
        return None

    def _evict_idle(self) -> bool:
        """Drop the connection idle longest, if one has been idle long enough.

        A script that leaks connections must not lock the operator out: a
        connection that never negotiated goes before a negotiated one, then
        the one that sent nothing for the longest (idle = no bytes received).
        """
        now = self._clock()
        idle = [c for c in self._clients.values()
                if now - c.last_input >= self.evict_idle_after]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (c.session.negotiated, c.last_input, c.number))
        log.warning("QMP client evicted client=%d idle_s=%.1f negotiated=%s clients=%d",
                    victim.number, now - victim.last_input, victim.session.negotiated,
                    len(self._clients))
        victim.close("evicted")
        return True

    def _refuse(self, sock, desc) -> None:
        """Answer with a QMP error instead of a greeting, and close."""
        self._quiet.log(logging.WARNING, "refused",
                        "QMP client refused reason=%r clients=%d", desc, len(self._clients))
        try:
            sock.setblocking(False)
            sock.send(refusal(desc))
        except OSError:
            pass
        sock.close()

    def _maybe_resume_accept(self) -> None:
        if self._accept_resume_at is not None and time.monotonic() >= self._accept_resume_at:
            self._accept_resume_at = None
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)

    def _drop_abandoned(self):
        """Drop connections whose partial message has waited ``partial_timeout``.

        A client that died or leaked its socket in the middle of a message
        would otherwise keep that message's buffer (up to 1 MiB) for as long
        as the process lives.  Returns the seconds until the next such
        deadline (None if no message is unfinished), for select().
        """
        now = self._clock()
        soonest = None
        for client in list(self._clients.values()):
            if client.decoder.idle:
                continue
            left = client.last_input + self.partial_timeout - now
            if left <= 0:
                client.close("partial-message-timeout")
            elif soonest is None or left < soonest:
                soonest = left
        return soonest

    def _forget(self, client: Connection) -> None:
        self._clients.pop(client.number, None)

    # -- teardown ------------------------------------------------------------

    def _shutdown(self) -> None:
        for client in list(self._clients.values()):
            client.close("shutdown")
        if self._listener is not None:
            self._listener.close()
        unlink_socket(self.path, self._socket_ino)
        self._selector.close()
        # All subscriptions are gone, so no emitter can still be in _notify
        # once unsubscribe() returned; the waker can be closed safely.
        self._close_waker()
        log.info("QMP control server stopped path=%s", self.path)

    def _close_waker(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

class _OncePerInterval:
    """Log a repeating condition once per interval, saying how often it happened."""

    def __init__(self, interval, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last = {}       # key -> (time logged, times suppressed since)

    def log(self, level, key, fmt, *args) -> bool:
        now = self._clock()
        last, suppressed = self._last.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[key] = (last, suppressed + 1)
            return False
        if suppressed:
            fmt += " (and %d more in the last %ds)"
            args += (suppressed, int(now - last))
        log.log(level, fmt, *args)
        self._last[key] = (now, 0)
        return True
