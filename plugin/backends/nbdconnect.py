"""Opening libnbd connections: any URI libnbd knows, bounded in time, secrets kept out of logs.

libnbd 1.14's connect_uri() has no timeout: a target whose process is
stopped (SIGSTOP) or a server that never accepts (qemu-nbd with --shared=1
already serving a client) accepts the TCP connection and then never
answers the handshake, and connect_uri() waits forever.  :func:`connect`
drives aio_connect_uri() with poll() against a deadline instead.
:class:`Attempt` runs one connect in a short-lived thread, so that the
caller (a job thread, the control thread) never waits longer than it
chooses to; it asks ``done`` / ``wait(timeout)`` and takes the handle.

A connection is *finished* when libnbd says it is dead or closed, or when
a command fails with an errno that means the server will not serve this
connection any more (ESHUTDOWN: a server that was sent SIGTERM answers
every new request so and keeps the socket open).  Callers treat a finished
connection as a dropped one and reconnect.
"""

import errno
import logging
import re
import threading
import time

from ..core.threads import Thread

log = logging.getLogger(__name__)

# A connect (TCP, TLS, NBD handshake) that takes longer than this fails.
CONNECT_TIMEOUT = 10.0

# These errnos of a command mean the connection will never serve again.
FINISHED_ERRNOS = frozenset({errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE,
                             errno.ECONNABORTED})

_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@?#]*)@", re.IGNORECASE)


def redact(uri):
    """The URI as it may be logged or shown: a password in the userinfo is dropped.

    The PSK username and file path stay (they are not secret; the key is
    in the file, which is never read here).
    """
    m = _USERINFO.match(uri)
    if not m or ":" not in m.group(2):
        return uri
    return m.group(1) + m.group(2).split(":", 1)[0] + "@" + uri[m.end():]


def nbd_errno(e):
    """libnbd's Error carries the errno as a name ("ENOSPC"); map it to the number."""
    name = getattr(e, "errno", None)
    if isinstance(name, int):
        return name
    return getattr(errno, name, errno.EIO) if name else errno.EIO


def is_finished(h, err=0):
    """True if the connection h can serve no more requests (err: a command's errno)."""
    if h is None:
        return True
    try:
        if h.aio_is_dead() or h.aio_is_closed():
            return True
    except Exception:   # a handle libnbd already closed
        return True
    return err in FINISHED_ERRNOS


def hang_up(h, grace=0.0):
    """Drop connection h, waiting at most grace seconds for the server to see
    NBD_CMD_DISC (shutdown() would wait as long as a stalled server takes)."""
    if h is None:
        return
    try:
        if not (h.aio_is_dead() or h.aio_is_closed()):
            h.aio_disconnect(0)
            deadline = time.monotonic() + grace
            while not (h.aio_is_dead() or h.aio_is_closed()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                h.poll(max(1, int(min(left, 0.1) * 1000)))
    except Exception:
        pass
    # libnbd 1.14 has no close(): the socket closes when the handle is collected.


def _message(uri, e):
    text = getattr(e, "string", None) or str(e)
    text = re.sub(r"^nbd_[a-z_]+: ", "", text)
    if "requires TLS" in text:
        text += " (the server wants TLS: use nbds:// or nbds+unix:// with tls-psk-file= " \
                "or tls-certificates=)"
    return "cannot connect to %s: %s" % (redact(uri), text)


def connect(uri, name="overlay", timeout=CONNECT_TIMEOUT, meta=True, should_stop=None):
    """A ready libnbd handle for uri, or OSError (ETIMEDOUT after timeout seconds).

    should_stop(): polled every 100 ms; when it returns True the connect
    gives up (ECANCELED).
    """
    import nbd
    h = nbd.NBD()
    h.set_handle_name(name)
    # tls-psk-file= and tls-certificates= name local files.
    h.set_uri_allow_local_file(True)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    deadline = time.monotonic() + timeout
    try:
        h.aio_connect_uri(uri)
        while h.aio_is_connecting():
            left = deadline - time.monotonic()
            if left <= 0:
                hang_up(h)
                raise OSError(errno.ETIMEDOUT, "cannot connect to %s: no NBD handshake within "
                              "%gs" % (redact(uri), timeout))
            if should_stop is not None and should_stop():
                hang_up(h)
                raise OSError(errno.ECANCELED, "connect to %s cancelled" % redact(uri))
            h.poll(max(1, int(min(left, 0.1) * 1000)))
    except nbd.Error as e:
        raise OSError(nbd_errno(e), _message(uri, e)) from None
    if not h.aio_is_ready():
        raise OSError(errno.ENOTCONN, "cannot connect to %s: connection closed during the "
                      "handshake" % redact(uri))
    return h


class Attempt:
    """One connect to uri in a thread of its own; see the module docstring.

    ``done`` says whether it ended; then ``take()`` returns the handle or
    raises its OSError.  ``cancel()`` makes it give up soon (a handle it
    made anyway is hung up).
    """

    def __init__(self, uri, name="overlay", timeout=CONNECT_TIMEOUT, meta=True):
        self.uri = uri
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._cancelled = False
        self._handle = None
        self._error = None
        self.started = time.monotonic()
        self._thread = Thread(target=self._run, args=(name, timeout, meta),
                              name="nbd-connect", daemon=True)
        self._thread.start()

    def _run(self, name, timeout, meta):
        try:
            h = connect(self.uri, name, timeout, meta, should_stop=lambda: self._cancelled)
        except OSError as e:
            self._error = e
        except Exception as e:   # a bug must still end the attempt
            self._error = OSError(errno.EIO, _message(self.uri, e))
        else:
            with self._lock:
                if not self._cancelled:
                    self._handle, h = h, None
            hang_up(h)
        self._event.set()

    @property
    def done(self):
        return self._event.is_set()

    def wait(self, timeout):
        """Wait up to timeout seconds for the attempt to end; returns done."""
        return self._event.wait(timeout)

    def take(self):
        """The handle (once) or the OSError; only when done."""
        if self._error is not None:
            raise self._error
        with self._lock:
            h, self._handle = self._handle, None
        return h

    def cancel(self):
        with self._lock:
            self._cancelled = True
            h, self._handle = self._handle, None
        hang_up(h)

    def join(self, timeout=None):
        self._thread.join(timeout)
