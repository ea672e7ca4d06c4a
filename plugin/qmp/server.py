"""QMP control server: sessions on a Unix socket, one background thread.

Layers: ``qmp_wire`` frames bytes into messages, ``qmp_commands`` checks
and runs commands, ``events`` carries events; this module owns the
sockets and the per-client QMP session state (greeting, capabilities
negotiation, id echo, event delivery).

Threading: ``start()`` starts ONE thread running a ``selectors`` loop over
the listening socket, every client, and a socketpair used to wake the loop
when events arrive or on ``stop()``.  Command handlers run on that thread
(they are quick by contract).  Nothing here ever blocks on a client, and
``EventBus.emit()`` never waits for us.

Output and back-pressure, per client:

- Writes are non-blocking from an output buffer.  Events move from the
  client's bounded event subscription into that buffer only while it holds
  less than ``max_output`` bytes, so a slow reader's backlog stays in its
  subscription queue.
- When that queue overflows (``event_queue`` events behind), the client
  has lost events: it is disconnected with a log line; others are
  unaffected.
- While the output buffer is full the server stops reading the client's
  requests, so a client that sends commands but never reads replies is
  throttled rather than allowed to grow the buffer without bound.

Ordering: each client's messages leave in one stream; events emitted
while a command runs reach the client before that command's reply, as in
QEMU (queued events are flushed into the buffer ahead of a reply).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import selectors
import socket
import stat
import struct
import threading
import time

from ..core.errors import CommandError
from .dispatch import parse_request
from .wire import DecodeError, StreamDecoder, encode

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_EVENT_QUEUE = 10_000
_PUMP_BATCH = 64
_RECV_SIZE = 64 * 1024
# After accept() fails for lack of resources (EMFILE...), the listener stays
# readable; ignore it this long instead of spinning.
_ACCEPT_BACKOFF = 0.5
# Control connections served at once; more are answered with an error and closed.
DEFAULT_MAX_CLIENTS = 64
# File descriptors kept free for nbdkit's NBD clients: a control connection is
# refused when fewer than this many would remain under RLIMIT_NOFILE.
DEFAULT_FD_RESERVE = 128
# Dropping a client that held this much input/output returns freed heap to the
# system (glibc keeps it otherwise, and RSS would stay at the high-water mark).
_TRIM_AFTER = 256 * 1024
# A condition that repeats (refusals, accept failures) is logged once per interval.
_LOG_INTERVAL = 60.0

_LISTENER = object()
_WAKER = object()


class _Client:
    """One QMP session."""

    def __init__(self, sock: socket.socket, number: int):
        self.sock = sock
        self.number = number
        self.decoder = StreamDecoder()
        self.out = bytearray()
        self.negotiated = False
        self.subscription = None
        self.eof = False        # the peer finished sending
        self.closed = False
        self.mask = selectors.EVENT_READ


class ControlServer:
    """Serves QMP on the Unix socket ``path``; see the module docstring."""

    def __init__(self, path, registry, bus, greeting_version=(0, 1, 0),
                 package: str = "overlay-nbd", max_output: int = DEFAULT_MAX_OUTPUT,
                 event_queue: int = DEFAULT_EVENT_QUEUE,
                 max_clients: int = DEFAULT_MAX_CLIENTS, fd_reserve: int = DEFAULT_FD_RESERVE):
        if not registry.allowed_before_negotiation("qmp_capabilities"):
            raise ValueError("registry lacks qmp_capabilities: call register_builtin_commands()")
        self.path = os.fspath(path)
        self.registry = registry
        self.bus = bus
        major, minor, micro = greeting_version
        self._greeting = encode({"QMP": {
            "version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                        "package": package},
            "capabilities": [],
        }})
        self.max_output = max_output
        self.event_queue = event_queue
        self.max_clients = max_clients
        self.fd_reserve = fd_reserve
        self._quiet = _OncePerInterval(_LOG_INTERVAL)
        self._lock = threading.Lock()
        self._thread = None
        self._stopping = False
        self._wake_pending = False
        self._clients: dict[int, _Client] = {}
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
            _remove_stale_socket(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(self.path)
                self._socket_ino = os.stat(self.path).st_ino
                # Connections are refused until listen(), so tightening the
                # mode first leaves no window in which others could connect.
                os.chmod(self.path, 0o600)
                listener.listen(16)
                listener.setblocking(False)
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._wake_w.setblocking(False)
                self._selector = selectors.DefaultSelector()
                self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
                self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKER)
            except BaseException:
                listener.close()
                self._unlink_socket()
                self._close_waker()
                raise
            self._listener = listener
            self._thread = threading.Thread(target=self._run, name="qmp-control", daemon=True)
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
                timeout = None
                if self._accept_resume_at is not None:
                    timeout = max(0.0, self._accept_resume_at - time.monotonic())
                for key, mask in self._selector.select(timeout):
                    if key.data is _LISTENER:
                        self._accept()
                    elif key.data is _WAKER:
                        self._consume_wake()
                    else:
                        self._service(key.data, mask)
                    if self._stopping:
                        break
                self._pump_events()
        except Exception:
            log.exception("QMP control loop failed path=%s", self.path)
        finally:
            self._shutdown()

    def _service(self, client: _Client, mask: int) -> None:
        if client.closed:
            return
        try:
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and not client.closed:
                self._flush(client)
                self._pump_client(client)
        except Exception:
            # A bug while serving one client must not take the others down.
            log.exception("QMP client failed client=%d", client.number)
            self._drop(client, "internal-error")

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
            if not self._peer_allowed(sock):
                continue
            refusal = self._refusal()
            if refusal is not None:
                self._refuse(sock, refusal)
                continue
            sock.setblocking(False)
            client = _Client(sock, self._next_client)
            self._next_client += 1
            self._clients[client.number] = client
            self._selector.register(sock, client.mask, client)
            log.info("QMP client connected client=%d", client.number)
            self._send(client, self._greeting)

    def _peer_allowed(self, sock: socket.socket) -> bool:
        """Only our own uid and root may talk to us, whatever the socket's mode
        (SO_PEERCRED: the credentials of the connecting process).  Others are
        closed before the greeting."""
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        except OSError as err:
            log.warning("QMP client refused: no peer credentials error=%s", err)
            sock.close()
            return False
        if uid in (0, self._uid):
            return True
        log.warning("QMP client refused: uid %d is neither the server's (%d) nor root pid=%d",
                    uid, self._uid, pid)
        sock.close()
        return False

    def _refusal(self):
        """Why a new control connection cannot be served now, or None."""
        if len(self._clients) >= self.max_clients:
            return "too many control connections (%d)" % self.max_clients
        free = _free_descriptors()
        if free is not None and free < self.fd_reserve:
            return ("too few file descriptors left (%d free, %d kept for NBD clients)"
                    % (free, self.fd_reserve))
        return None

    def _refuse(self, sock, desc) -> None:
        """Answer with a QMP error instead of a greeting, and close."""
        self._quiet.log(logging.WARNING, "refused",
                        "QMP client refused reason=%r clients=%d", desc, len(self._clients))
        try:
            sock.setblocking(False)
            sock.send(encode(CommandError(desc).to_reply()))
        except OSError:
            pass
        sock.close()

    def _maybe_resume_accept(self) -> None:
        if self._accept_resume_at is not None and time.monotonic() >= self._accept_resume_at:
            self._accept_resume_at = None
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, f"recv-error:{errno.errorcode.get(err.errno, err.errno)}")
            return
        if not data:
            # The peer is done sending; answer what it sent, then close.
            client.eof = True
            self._update_mask(client)
            return
        for item in client.decoder.feed(data):
            if client.closed:
                return
            self._handle(client, item)

    def _handle(self, client: _Client, item) -> None:
        negotiated = client.negotiated
        if isinstance(item, DecodeError):
            reply = encode(CommandError(item.desc).to_reply())
        else:
            reply = self._dispatch(client, item)
        if not negotiated and client.negotiated:
            # qmp_capabilities: its reply comes first, then the first events
            # (a start-up backlog, docs/jobs.md), as a QMP client expects.
            self._send(client, reply)
            self._pump_client(client)
            return
        # Every event queued so far, including those the command emitted,
        # goes out before the reply, as in QEMU.
        self._pump_client(client, force=True)
        if not client.closed:
            self._send(client, reply)

    def _dispatch(self, client: _Client, msg: dict) -> bytes:
        """Run one request; returns the encoded reply (with the id echoed)."""
        name = msg.get("execute")
        try:
            name, args, _, _ = parse_request(msg)
            if not client.negotiated:
                if not self.registry.allowed_before_negotiation(name):
                    raise CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                                   "CommandNotFound")
            elif name == "qmp_capabilities":
                raise CommandError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            reply = {"return": self.registry.execute(name, args)}
            if name == "qmp_capabilities":
                self._negotiated(client)
        except CommandError as err:
            reply = err.to_reply()
        except Exception as err:
            log.exception("QMP command failed client=%d command=%s", client.number, name)
            reply = CommandError(str(err) or type(err).__name__).to_reply()
        if "id" in msg:
            reply["id"] = msg["id"]
        try:
            return encode(reply)
        except (TypeError, ValueError) as err:
            log.error("QMP reply not serialisable client=%d command=%s error=%s",
                      client.number, name, err)
            reply = CommandError(f"internal error: reply not serialisable: {err}").to_reply()
            if "id" in msg:
                try:
                    encode(msg["id"])
                    reply["id"] = msg["id"]
                except (TypeError, ValueError):
                    pass
            return encode(reply)

    def _negotiated(self, client: _Client) -> None:
        client.negotiated = True
        client.subscription = self.bus.subscribe(self.event_queue, notify=self._notify)
        log.info("QMP client negotiated client=%d", client.number)

    def _pump_events(self) -> None:
        """Move queued events into the output buffers of negotiated clients."""
        for client in list(self._clients.values()):
            self._pump_client(client)

    def _pump_client(self, client: _Client, force: bool = False) -> None:
        """Move this client's queued events to its output buffer and send.

        Stops at ``max_output`` unless ``force`` (used before a reply, to
        keep order); the rest waits in the subscription queue.
        """
        sub = client.subscription
        if sub is None or client.closed:
            return
        if sub.overflowed:
            self._drop(client, "event-queue-overflow")
            return
        while not client.closed:
            moved = False
            while force or len(client.out) < self.max_output:
                events = sub.drain(_PUMP_BATCH)
                if not events:
                    break
                for event in events:
                    try:
                        client.out += encode(event)
                    except (TypeError, ValueError) as err:
                        log.error("Event not serialisable event=%s error=%s",
                                  event.get("event"), err)
                moved = True
            if not moved:
                return
            self._flush(client)
            # Nothing else wakes us for the events still queued unless the
            # socket stays full (then EVENT_WRITE does): go on while it drains.
            if len(client.out) >= self.max_output:
                return

    # -- output --------------------------------------------------------------

    def _send(self, client: _Client, data: bytes) -> None:
        client.out += data
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self._drop(client, f"send-error:{errno.errorcode.get(err.errno, err.errno)}")
                return
            del client.out[:sent]
        self._update_mask(client)

    def _update_mask(self, client: _Client) -> None:
        if client.eof and not client.out:
            self._drop(client, "eof")
            return
        # A full output buffer pauses reading: back-pressure on requests.
        reading = not client.eof and len(client.out) < self.max_output
        mask = selectors.EVENT_READ if reading else 0
        if client.out:
            mask |= selectors.EVENT_WRITE
        if mask != client.mask:
            client.mask = mask
            self._selector.modify(client.sock, mask, client)

    def _drop(self, client: _Client, reason: str) -> None:
        if client.closed:
            return
        client.closed = True
        # Log before closing, so the line exists by the time the peer sees EOF.
        if reason in ("eof", "shutdown"):
            log.info("QMP client disconnected client=%d reason=%s", client.number, reason)
        else:
            log.warning("QMP client dropped client=%d reason=%s pending_output=%d",
                        client.number, reason, len(client.out))
        self._clients.pop(client.number, None)
        held = client.decoder.buffered + len(client.out)
        if client.subscription is not None:
            self.bus.unsubscribe(client.subscription)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.decoder.clear()
        client.out = bytearray()
        if held >= _TRIM_AFTER:
            _release_free_memory()

    # -- teardown ------------------------------------------------------------

    def _shutdown(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client, "shutdown")
        if self._listener is not None:
            self._listener.close()
        self._unlink_socket()
        self._selector.close()
        # All subscriptions are gone, so no emitter can still be in _notify
        # once unsubscribe() returned; the waker can be closed safely.
        self._close_waker()
        log.info("QMP control server stopped path=%s", self.path)

    def _close_waker(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _unlink_socket(self) -> None:
        """Remove our socket file, unless someone else replaced it since."""
        try:
            if self._socket_ino is not None and os.stat(self.path).st_ino == self._socket_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


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


def _release_free_memory() -> None:
    """malloc_trim(0): give freed heap pages back (glibc only; elsewhere a no-op)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _free_descriptors():
    """File descriptors still free under RLIMIT_NOFILE (None if unlimited or unknown)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir("/proc/self/fd")) - 1     # less listdir's own descriptor
    except OSError:
        return None
    return soft - used


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "control socket path exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as err:
        raise OSError(errno.EADDRINUSE, f"control socket may be in use ({err})", path) from err
    else:
        raise OSError(errno.EADDRINUSE, "control socket is in use by another server", path)
    finally:
        probe.close()
    log.info("Removing stale control socket path=%s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
