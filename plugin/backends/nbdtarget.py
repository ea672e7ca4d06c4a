"""An NBD export as an asynchronous copy target (the mirror's), and its reader.

The job thread submits writes, zeroes and flushes tagged with what they
cover, then collects completions with wait(), so that a stalled target never
blocks the thread (cancel stays prompt).  Only the job thread calls these
methods, so the target is one libnbd handle driven by aio_* calls and poll()
(no completion callbacks: nothing runs inside libnbd's locks).

A failed request comes back from wait() with its errno; the caller decides
what it means (the job's error policy).  Nothing is ever dropped: a request
that could not even be sent comes back as a failed completion too.  A target
whose connection is finished reconnects in the background; within its
reconnect delay that is invisible to the caller (requests wait and are sent
again), after it requests come back as ENOTCONN, whatever libnbd's own text
says, and reconnect() brings a new connection once the server is back.
"""

import errno
import logging
import os
import socket
import threading
import time

from ..core.host import server_instance
from .nbd import nbd_extents
from .nbdconnect import (CONNECT_TIMEOUT, Attempt, connect, hang_up, is_finished, nbd_errno,
                         redact)

# Not connected: a new connect attempt starts at most this often.
RECONNECT_INTERVAL = 0.25
# At most this many libnbd steps per _pump() (a TLS record is 16 KiB: 4 MiB).
PUMP_STEPS = 256

log = logging.getLogger(__name__)

MAX_ZERO = 1 << 30        # NBD requests carry a 32-bit length


class NbdTarget:
    """An NBD export through one libnbd handle, asynchronously.

    Connecting never blocks the caller: the first connection and every
    reconnect run in an :class:`~.nbdconnect.Attempt` thread; wait_open()
    waits for the first as long as its caller chooses.

    A finished connection (dead, closed, or a request answered with
    ESHUTDOWN) is hung up and replaced in the background.  Within
    ``reconnect_delay`` seconds of the loss every request pending on it,
    and every request submitted meanwhile, waits and is sent on the new
    connection; nothing completes in the meantime.  After the delay (at
    once when it is 0) they come back from wait() as ENOTCONN.  Whatever
    the delay, on_loss() is called (in the caller's thread, inside the call
    that noticed the loss) before anything is sent on a new connection:
    writes acknowledged on the lost connection but not flushed may be lost,
    and the caller copies them again.  A batch of completions from wait()
    never mixes the two connections: completions collected together with a
    loss are sent again rather than reported.
    """

    def __init__(self, uri, reconnect_delay=0.0, on_loss=None, clock=time.monotonic):
        import nbd
        self._nbd = nbd
        self.address = uri
        self.reconnect_delay = reconnect_delay
        self.on_loss = on_loss
        self._clock = clock
        self._pending = {}           # cookie -> (tag, buffer kept alive, send)
        self._waiting = []           # [(tag, buffer, send)] to send on the next connection
        self._failed = []            # [(tag, errno)] that wait() returns next
        self._h = None
        self._size = None
        self._tls = False            # the connection is TLS (_pump only matters then)
        self._can_zero = False
        self.multi_conn = False
        self._instance = None
        self.losses = 0
        self._lost_at = None         # when the connection was lost (None: connected)
        self._attempt = Attempt(uri, "mirror-target")
        self._next_attempt = 0.0

    # -- connecting --------------------------------------------------------

    def wait_open(self, timeout):
        """Wait up to timeout for the first connection: True when open, False if
        still connecting; raises the OSError of a failed connect."""
        if self._size is not None:
            return True
        if not self._attempt.wait(timeout):
            return False
        attempt, self._attempt = self._attempt, None
        self._adopt(attempt.take())
        return True

    def _adopt(self, h):
        nbd = self._nbd
        if h.is_read_only():
            hang_up(h)
            raise OSError(errno.EROFS, "target %s is read-only" % redact(self.address))
        size = h.get_size()
        if self._size is not None and size != self._size:
            hang_up(h)
            raise OSError(errno.EIO, "target %s came back with size %d instead of %d"
                          % (redact(self.address), size, self._size))
        self._h = h
        _grow_send_buffer(h.aio_get_fd())
        self._size = size
        self._can_zero = bool(h.can_zero())
        self._extents_ok = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.multi_conn = bool(h.can_multi_conn())
        try:
            self._tls = bool(h.get_tls_negotiated())
        except nbd.Error:
            self._tls = True         # unknown: _pump runs, as it always did
        self._instance = server_instance(h.aio_get_fd()) if self.multi_conn else None
        if self._lost_at is None:
            log.info("Mirror target connected uri=%s size=%d", redact(self.address), size)
        else:
            log.info("Mirror target reconnected uri=%s after=%.1fs resending=%d",
                     redact(self.address), self._clock() - self._lost_at, len(self._waiting))
        self._lost_at = None
        waiting, self._waiting = self._waiting, []
        for tag, keep, send in waiting:
            self._send(tag, send, keep)

    def _poll_attempt(self, timeout=0.0):
        """Not connected: advance the reconnect (start one, or adopt a finished one)."""
        if self._attempt is None:
            if self._clock() < self._next_attempt:
                return
            self._attempt = Attempt(self.address, "mirror-target")
        if not self._attempt.wait(timeout):
            return
        attempt, self._attempt = self._attempt, None
        self._next_attempt = self._clock() + RECONNECT_INTERVAL
        try:
            self._adopt(attempt.take())
        except OSError as e:
            log.warning("Mirror target reconnect failed uri=%s error=%s",
                        redact(self.address), e)

    def _within_delay(self):
        return (self._lost_at is not None
                and self._clock() - self._lost_at < self.reconnect_delay)

    def _lose(self):
        """The connection is finished: hang up, park what was pending, tell the caller."""
        h, self._h = self._h, None
        if h is None:
            return
        self.losses += 1
        if self._lost_at is None:
            self._lost_at = self._clock()
        log.info("Mirror target connection lost uri=%s pending=%d reconnect_delay=%s",
                 redact(self.address), len(self._pending), self.reconnect_delay)
        pending = list(self._pending.values())
        self._pending.clear()
        hang_up(h)
        for tag, keep, send in pending:
            self._park(tag, send, keep)
        if self.on_loss is not None:
            self.on_loss()
        self._poll_attempt()

    def _park(self, tag, send, keep):
        """Not connected: hold the request for the next connection, or fail it."""
        if self._within_delay():
            self._waiting.append((tag, keep, send))
        else:
            self._failed.append((tag, errno.ENOTCONN))

    def _expire(self):
        """The reconnect delay is over: what waits fails."""
        if self._waiting and not self._within_delay():
            log.warning("Mirror target not back within reconnect-delay uri=%s delay=%s "
                        "failing=%d", redact(self.address), self.reconnect_delay,
                        len(self._waiting))
            self._failed += [(tag, errno.ENOTCONN) for tag, _, _ in self._waiting]
            self._waiting.clear()

    def reconnect(self, timeout=0.0):
        """After errors: make sure a new connection is on its way, waiting up to
        timeout for it.  True if connected now."""
        if self._h is not None and is_finished(self._h):
            self._lose()
        if self._h is None:
            self._next_attempt = 0.0
            self._poll_attempt(timeout)
        return self._h is not None

    # -- requests ------------------------------------------------------------

    def size(self):
        return self._size

    def instance(self):
        """The NBD server process of this connection (server_instance()), or None:
        not connected, no multi-conn, or not a local server over a Unix socket."""
        return self._instance if self._h is not None else None

    def open_reader(self):
        """A Reader on a connection of its own (a restored mirror compares what it
        had copied in a helper thread while this connection copies)."""
        return NbdReader(self.address)

    def extents(self, offset, length, timeout=CONNECT_TIMEOUT):
        """Block status on the job's connection (only used at start), bounded in time."""
        deadline = self._clock() + timeout

        def call(fn):
            if self._h is None:
                raise OSError(errno.ENOTCONN, "not connected to %s" % redact(self.address))
            return fn(_BoundedBlockStatus(self._h, deadline, self._clock))

        try:
            return nbd_extents(call, offset, length, self._size, self._extents_ok)
        except self._nbd.Error as e:
            raise OSError(nbd_errno(e), str(e)) from None

    def in_flight(self):
        return len(self._pending) + len(self._failed) + len(self._waiting)

    def _send(self, tag, send, keep=None):
        """Send one request (send(handle) -> cookie); a failure to send is a completion."""
        if self._h is None:
            self._poll_attempt()
        if self._h is None:
            self._park(tag, send, keep)
            return
        try:
            cookie = send(self._h)
        except self._nbd.Error as e:
            err = nbd_errno(e)
            if is_finished(self._h, err):
                self._lose()
                self._park(tag, send, keep)
            else:
                self._failed.append((tag, err))
            return
        self._pending[cookie] = (tag, keep, send)
        self._pump()

    def _pump(self):
        """Push queued request data into the socket while it takes it.

        Over TLS libnbd 1.14 hands one TLS record (16 KiB) to the socket per
        state-machine step and then waits for the next poll(), so a 1 MiB
        write would trickle out one record per turn of the job loop (64 turns
        of Python per MiB).  Here the steps run back to back, each a poll(0)
        that only goes on while the socket is writable (or a reply is
        readable); over plain TCP one step already sends everything the
        socket takes, so this usually stops at once.
        """
        if not self._tls:
            return
        h = self._h
        write = self._nbd.AIO_DIRECTION_WRITE
        try:
            for _ in range(PUMP_STEPS):
                if not h.aio_get_direction() & write or not h.poll(0):
                    return
        except self._nbd.Error as e:
            # The next wait()/_collect() finds out what it means.
            log.debug("Mirror target pump stopped uri=%s error=%s", redact(self.address), e)

    def submit_write(self, buf, offset, tag):
        abuf = self._nbd.Buffer.from_buffer(buf)
        self._send(tag, lambda h: h.aio_pwrite(abuf, offset), abuf)

    def submit_zero(self, offset, length, tag):
        if not self._can_zero:
            self.submit_write(bytearray(length), offset, tag)
            return
        self._send(tag, lambda h: h.aio_zero(length, offset))

    def submit_flush(self, tag):
        """Flush the writes that completed before this call."""
        self._send(tag, lambda h: h.aio_flush())

    def wait(self, timeout):
        """Completions so far (waiting up to timeout for one): [(tag, errno or 0)]."""
        result = self._collect()
        if result:
            return result
        if self._h is None:
            if self._waiting:
                self._poll_attempt(timeout)
                self._expire()
            return self._collect()
        if not self._pending:
            return result
        try:
            self._h.poll(int(timeout * 1000))
        except self._nbd.Error as e:
            log.warning("Mirror target poll failed uri=%s error=%s", redact(self.address), e)
        else:
            self._pump()
        return self._collect()

    def _collect(self):
        result, self._failed = self._failed, []
        if not self._pending:
            return result
        h = self._h
        ended = []                   # (cookie, errno) of requests that completed
        # Answers first: a connection that is gone retires what was in flight
        # with errors, which _completed sees; only a collect that found no
        # answer asks libnbd whether the connection is still there.
        lost = h is None or self._completed(h, ended) or (not ended and is_finished(h))
        if lost:
            # Nothing of this batch is reported: _lose() sends it all again
            # (or fails it with ENOTCONN).
            self._lose()
            result, self._failed = result + self._failed, []
            return result
        for cookie, err in ended:
            tag, _, _ = self._pending.pop(cookie)
            result.append((tag, err))
        return result

    def _completed(self, h, ended):
        """Retire the requests libnbd has answers for into ended; True if the
        connection is lost.  aio_peek_command_completed names them one at a
        time: two calls per answer, where asking about each request in flight
        cost a call (a release of the GIL) per request per turn."""
        nbd, lost = self._nbd, False
        try:
            while True:
                cookie = h.aio_peek_command_completed()
                if cookie <= 0:
                    return lost
                try:
                    h.aio_command_completed(cookie)
                    err = 0
                except nbd.Error as e:
                    err = nbd_errno(e) or errno.EIO
                    lost = lost or is_finished(h, err)
                if cookie in self._pending:
                    ended.append((cookie, err))
        except nbd.Error as e:
            # libnbd holds none of our requests (EINVAL): none can complete.
            err = nbd_errno(e) or errno.EIO
            done = {c for c, _ in ended}
            ended.extend((c, err) for c in self._pending if c not in done)
            return lost or is_finished(h, err)

    def detach(self):
        """Hand the connection over (to the pivoted disk); nothing may be in flight.
        None if not connected."""
        h, self._h = self._h, None
        return h

    def close(self):
        """Drop the connection; requests still in flight are abandoned."""
        if self._attempt is not None:
            self._attempt.cancel()
            self._attempt = None
        h, self._h = self._h, None
        hang_up(h, grace=0.5)       # libnbd closes the handle when it is collected
        self._pending.clear()
        self._failed.clear()
        self._waiting.clear()


class _BoundedBlockStatus:
    """Stands in for a handle in nbd_extents(): block_status with a deadline."""

    def __init__(self, h, deadline, clock):
        self._h, self._deadline, self._clock = h, deadline, clock

    def block_status(self, count, offset, callback):
        h = self._h
        cookie = h.aio_block_status(count, offset, callback)
        while not h.aio_command_completed(cookie):
            left = self._deadline - self._clock()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "block status of the target timed out")
            h.poll(max(1, int(min(left, 0.1) * 1000)))


SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32


def _grow_send_buffer(fd):
    """Let the kernel take a whole chunk at submit time.

    Our one thread reads the source and drives the connection; with the default
    ~200 KiB socket buffer the target idles while we read the next chunk.  A
    larger buffer lets each aio_pwrite hand its data to the kernel at once, so
    the target works while we read.  SO_SNDBUFFORCE (root) passes wmem_max.
    """
    sock = socket.socket(fileno=os.dup(fd))
    try:
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
                return
            except OSError:
                continue
    finally:
        sock.close()


class NbdReader:
    """read(length, offset) -> bytes over a connection of its own, with libnbd's
    synchronous pread (its loop runs in C: about 2.5x the aio loop's rate from
    Python).  interrupt(), from another thread, shuts the socket down, so a read
    that hangs on a stalled server returns with an error."""

    def __init__(self, uri):
        self._uri = uri
        self._h = None
        self._sock = None
        self._lock = threading.Lock()
        self._interrupted = False

    def read(self, length, offset):
        import nbd
        if self._h is None:
            h = connect(self._uri, "mirror-verify", meta=False,
                        should_stop=lambda: self._interrupted)
            with self._lock:
                self._h = h
                self._sock = socket.socket(fileno=os.dup(h.aio_get_fd()))
                if self._interrupted:
                    self._sock.shutdown(socket.SHUT_RDWR)
        try:
            return self._h.pread(length, offset)
        except nbd.Error as e:
            raise OSError(nbd_errno(e), str(e)) from None

    def interrupt(self):
        with self._lock:
            self._interrupted = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        with self._lock:
            h, self._h = self._h, None
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if h is not None:
            hang_up(h)
