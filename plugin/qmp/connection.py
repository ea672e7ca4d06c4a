"""One control connection: its socket, its buffers and back-pressure.

The control server (server.py) accepts connections and runs the selector
loop; a :class:`Connection` does the I/O of one of them on that loop's
thread and never blocks:

- ``read()`` takes what the socket has, frames it (wire.StreamDecoder) and
  hands each message to the connection's QMP session (session.py);
- output goes through a buffer sent as the socket takes it; while the
  buffer holds ``max_output`` bytes or more, reading stops, so a client
  that sends commands but never reads replies is throttled instead of
  growing the buffer without bound;
- ``close(reason)`` drops the connection with one log line and gives the
  heap back to the system if it held much.

It is the session's :class:`~plugin.qmp.session.Channel`.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket

from .session import Channel
from .wire import StreamDecoder

log = logging.getLogger(__name__)

_RECV_SIZE = 64 * 1024
# Dropping a connection that held this much input/output returns freed heap to
# the system (glibc keeps it otherwise, and RSS would stay at the high-water mark).
_TRIM_AFTER = 256 * 1024


class Connection(Channel):
    """A client socket registered with ``selector``; ``on_close(self)`` runs once when dropped.

    ``last_input`` is when the peer last sent anything (``clock()``, at first
    the connect): the server evicts the connection idle longest when full.
    """

    def __init__(self, sock: socket.socket, number: int, selector, max_output: int, on_close,
                 clock):
        sock.setblocking(False)
        self.sock = sock
        self.number = number
        self.session = None     # set by the server right after the greeting
        self.decoder = StreamDecoder()
        self.out = bytearray()
        self.eof = False        # the peer finished sending
        self.closed = False
        self.mask = selectors.EVENT_READ
        self.max_output = max_output
        self._clock = clock
        self.last_input = clock()
        self._selector = selector
        self._on_close = on_close
        selector.register(sock, self.mask, self)

    def read(self) -> None:
        """Receive once and answer every complete message (the socket is readable)."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.close(f"recv-error:{errno.errorcode.get(err.errno, err.errno)}")
            return
        if not data:
            # The peer is done sending; answer what it sent, then close.
            self.eof = True
            self._update_mask()
            return
        self.last_input = self._clock()
        for item in self.decoder.feed(data):
            if self.closed:
                return
            self.session.handle(item)

    # -- Channel -------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        self.out += data

    def has_room(self) -> bool:
        return len(self.out) < self.max_output

    def flush(self) -> None:
        """Send what the socket takes now; the rest waits for EVENT_WRITE."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                self.close(f"send-error:{errno.errorcode.get(err.errno, err.errno)}")
                return
            del self.out[:sent]
        self._update_mask()

    def close(self, reason: str) -> None:
        """Drop the connection (idempotent): log, unsubscribe, close the socket."""
        if self.closed:
            return
        self.closed = True
        # Log before closing, so the line exists by the time the peer sees EOF.
        if reason in ("eof", "shutdown", "evicted"):   # evicted: the server said why
            log.info("QMP client disconnected client=%d reason=%s", self.number, reason)
        else:
            log.warning("QMP client dropped client=%d reason=%s pending_output=%d",
                        self.number, reason, len(self.out))
        self._on_close(self)
        held = self.decoder.buffered + len(self.out)
        if self.session is not None:
            self.session.close()
        try:
            self._selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self.decoder.clear()
        self.out = bytearray()
        if held >= _TRIM_AFTER:
            release_free_memory()

    def _update_mask(self) -> None:
        if self.eof and not self.out:
            self.close("eof")
            return
        # A full output buffer pauses reading: back-pressure on requests.
        reading = not self.eof and len(self.out) < self.max_output
        mask = selectors.EVENT_READ if reading else 0
        if self.out:
            mask |= selectors.EVENT_WRITE
        if mask != self.mask:
            self.mask = mask
            self._selector.modify(self.sock, mask, self)


def release_free_memory() -> None:
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
