"""Write-through channels: synchronous, deadline-bounded writes to a copy target.

A write-blocking mirror writes each client change to its target in the
client's thread (plugin/blockcopy/writeblocking.py); these channels are the
storage side of that, one per target kind, picked by :func:`open_through`:

    write(kind, offset, length, buf, deadline, stop) -> None (done) or why it fell back
    flush(deadline) -> None (flushed, or nothing to flush) or why it fell back
    overlaps(offset, length) -> a request that timed out may still land there
    reap()                   collect late answers (never waits)
    connected, close()

``kind`` is "write" (with buf), "zero" or "trim".  A channel never waits
past ``deadline`` (a clock() value): a request the target has not answered
by then is *abandoned*, remembered until the target answers it, and while
anything is abandoned the channel falls back at once (an older request
could otherwise land after a newer one).  ``stop()`` (optional) ends a
write's wait early, as if the deadline had passed: the job is going away.
An error the target gave raises OSError with its errno; a lost connection
raises ENOTCONN and the next write connects again.  A channel is not thread safe: its caller holds one
lock around every call.

An NBD channel is a connection of its own, opened in the background on
first use (only the write that starts a connect waits for it, within its
deadline).  A file or an RBD image is written through its synchronous
backend, which has no deadline to miss: it never falls back.
"""

import errno
import logging
import time

from .nbdconnect import Attempt, hang_up, is_finished, nbd_errno, redact

log = logging.getLogger(__name__)

# After a failed connect, writes fall back without trying again for this long.
RETRY_CONNECT = 1.0
# A waiting write looks this often whether it should stop (stop()).
STOP_SLICE = 0.05


def open_through(address, clock=time.monotonic):
    """The write-through channel for a target address (file path, NBD URI, rbd://)."""
    from . import is_nbd_uri
    if is_nbd_uri(address):
        return NbdThrough(address, clock)
    return BackendThrough(address)


class BackendThrough:
    """A file or RBD target through its synchronous backend (opened on first use)."""

    def __init__(self, address):
        self.address = address
        self._backend = None
        self._written = False

    @property
    def connected(self):
        return self._backend is not None

    def write(self, kind, offset, length, buf, deadline, stop=None):
        if self._backend is None:
            from . import open_backend
            self._backend = open_backend(self.address, readonly=False)
        if kind == "write":
            self._backend.write(buf, offset)
        else:
            self._backend.zero(offset, length, may_trim=(kind == "trim"))
        self._written = True
        return None

    def flush(self, deadline):
        if self._written and self._backend is not None:
            self._backend.flush()
            self._written = False
        return None

    def overlaps(self, offset, length):
        return False

    def reap(self):
        """Synchronous writes leave nothing to collect."""

    def close(self):
        backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()


class NbdThrough:
    """An NBD export over a libnbd connection of its own, one request at a time."""

    def __init__(self, address, clock=time.monotonic):
        import nbd
        self._nbd = nbd
        self.address = address
        self._clock = clock
        self._h = None
        self._attempt = None
        self._abandoned = []              # [(cookie, offset, length)] that timed out
        self._written = False             # written since the last flush
        self._next_attempt = 0.0          # no new connect before (after one failed)

    @property
    def connected(self):
        return self._h is not None

    def write(self, kind, offset, length, buf, deadline, stop=None):
        self.reap()
        if self._abandoned:
            return "the target has not answered an earlier write-through"
        h = self._connection(deadline, stop)
        if h is None:
            return "no connection to the target yet"
        nbd = self._nbd
        try:
            if kind == "write":
                cookie = h.aio_pwrite(bytes(buf), offset)
            else:
                flags = 0 if kind == "trim" else nbd.CMD_FLAG_NO_HOLE
                if h.can_zero():
                    cookie = h.aio_zero(length, offset, flags=flags)
                else:
                    cookie = h.aio_pwrite(bytes(length), offset)
            if not self._wait(h, cookie, deadline, stop):
                self._abandoned.append((cookie, offset, length))
                return "the target did not answer in time"
        except nbd.Error as e:
            raise self._failed(h, e, "write-through to") from None
        self._written = True
        return None

    def flush(self, deadline):
        if not self._written or self._h is None:
            return None
        self.reap()
        if self._abandoned:
            return "the target has not answered an earlier write-through"
        h = self._h
        nbd = self._nbd
        try:
            cookie = h.aio_flush()
            if not self._wait(h, cookie, deadline):
                self._abandoned.append((cookie, 0, 0))
                return "the target did not answer the flush in time"
        except nbd.Error as e:
            raise self._failed(h, e, "flush of") from None
        self._written = False
        return None

    def overlaps(self, offset, length):
        end = offset + length
        return any(o < end and offset < o + n for _, o, n in self._abandoned)

    def reap(self):
        if not self._abandoned:
            return
        h = self._h
        if h is None or is_finished(h):
            # A connection that ended carries nothing more to the target.
            self._abandoned.clear()
            self._hang_up()
            return
        nbd = self._nbd
        try:
            h.poll(0)
        except nbd.Error:
            pass
        still = []
        for cookie, offset, length in self._abandoned:
            try:
                if not h.aio_command_completed(cookie):
                    still.append((cookie, offset, length))
            except nbd.Error:
                # It failed late: the range is dirty anyway (it fell back).
                pass
        self._abandoned = still
        if is_finished(h):
            self._abandoned.clear()
            self._hang_up()

    def close(self):
        """Drop the connection and any connect under way; never waits for the target."""
        self._abandoned.clear()
        self._hang_up()
        if self._attempt is not None:
            self._attempt.cancel()
            self._attempt = None

    def _connection(self, deadline, stop=None):
        """The connected handle, or None if it is not there by the deadline
        or stop() (the connect goes on in the background)."""
        if self._h is not None and is_finished(self._h):
            self._hang_up()
        if self._h is not None:
            return self._h
        if self._attempt is None:
            if self._clock() < self._next_attempt:
                return None
            # Only the write that starts a connect waits for it.
            self._attempt = Attempt(self.address, "mirror-through", meta=False)
            wait = max(0.0, deadline - self._clock())
        else:
            wait = 0.0
        if not self._await_attempt(wait, stop):
            return None
        attempt, self._attempt = self._attempt, None
        try:
            self._h = attempt.take()
        except OSError as e:
            # Unreachable, refused, silent: the job's own connection finds out
            # too, and its reconnect-delay and policy decide; writes fall back.
            log.info("Write-through cannot connect target=%s error=%s", redact(self.address), e)
            self._next_attempt = self._clock() + RETRY_CONNECT
            return None
        return self._h

    def _await_attempt(self, wait, stop):
        """Wait up to `wait` seconds for the connect under way; False if it is
        not done by then, or stop() said to give up first."""
        if stop is None:
            return self._attempt.wait(wait)
        end = time.monotonic() + wait
        while not self._attempt.wait(max(0.0, min(end - time.monotonic(), STOP_SLICE))):
            if time.monotonic() >= end or stop():
                return False
        return True

    def _wait(self, h, cookie, deadline, stop=None):
        while not h.aio_command_completed(cookie):
            left = deadline - self._clock()
            if left <= 0 or (stop is not None and stop()):
                return False
            h.poll(max(1, int(min(left, STOP_SLICE) * 1000)))
        return True

    def _failed(self, h, e, what):
        """The OSError for a libnbd error on h; a finished connection is hung up (ENOTCONN)."""
        err = nbd_errno(e)
        if is_finished(h, err):
            self._hang_up()
            err = errno.ENOTCONN
        return OSError(err, "%s %s: %s" % (what, redact(self.address), e))

    def _hang_up(self):
        h, self._h = self._h, None
        hang_up(h)
