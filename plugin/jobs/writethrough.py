"""copy-mode=write-blocking: client changes go to the mirror target synchronously.

The mirror's disk listener calls :meth:`WriteThrough.apply` in the client's
thread after the change completed on the disk; it holds the mirror's range
lock over the granules it touches, so a background copy of an overlapping
range (which holds the same lock while in flight) can never land after it.

A client never waits longer than ``timeout`` (THROUGH_TIMEOUT) for the
target: not for the range lock, the connection (opened in the background
on first use, or again after it was lost) or the request.  Past it the
change *falls back*: apply() returns False and the mirror marks the range
dirty for its background copy.  A request that timed out may still land
later, so it is remembered (abandoned) until the target answers it, and
the job copies nothing over its granules meanwhile (:meth:`blocks`); while
anything is abandoned, changes fall back at once.  The job thread calls
:meth:`reap` to collect those late answers.  A real error (the target
answered with an errno, or the connection died) raises OSError: the
job's policy applies; a connect that fails falls back (the job's own
connection and its reconnect-delay decide about a target that is gone).
"""

import errno
import logging
import threading
import time

from ..backends.nbdconnect import Attempt, hang_up, is_finished, nbd_errno, redact

log = logging.getLogger(__name__)

# The longest a client change waits for the target in write-blocking mode.
THROUGH_TIMEOUT = 2.0
# After a failed connect, changes fall back without trying again for this long.
RETRY_CONNECT = 1.0


class WriteThrough:
    def __init__(self, address, ranges, granularity, timeout=THROUGH_TIMEOUT,
                 clock=time.monotonic):
        self.address = address
        self._ranges = ranges
        self._granularity = granularity
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()     # one connection, one request at a time
        self._h = None
        self._attempt = None
        self._file = None                 # a file target: plain synchronous writes
        self._abandoned = []              # [(cookie, first, end)] that timed out
        self._written = False             # written since the last flush
        self._next_attempt = 0.0          # no new connect before (after one failed)
        self.fallbacks = 0

    # -- client threads ----------------------------------------------------

    def apply(self, kind, offset, length, buf):
        """Write ("write", with buf), zero or trim the range on the target.

        True if done, False if it fell back (the caller marks the range
        dirty); raises OSError for an error the target gave.
        """
        deadline = self._clock() + self._timeout
        g = self._granularity
        first, end = offset // g, (offset + length + g - 1) // g
        token = self._ranges.acquire(first, end, timeout=self._timeout)
        if token is None:
            return self._fell_back("a background copy of the range is still in flight")
        try:
            if not self._lock.acquire(timeout=max(0.0, deadline - self._clock())):
                return self._fell_back("another write-through is waiting for the target")
            try:
                return self._apply_locked(kind, offset, length, buf, first, end, deadline)
            finally:
                self._lock.release()
        finally:
            self._ranges.release(token)

    def _apply_locked(self, kind, offset, length, buf, first, end, deadline):
        if not self._is_nbd():
            return self._apply_file(kind, offset, length, buf)
        self._reap_locked()
        if self._abandoned:
            return self._fell_back("the target has not answered an earlier write-through")
        h = self._connection(deadline)
        if h is None:
            return self._fell_back("no connection to the target yet")
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
            if not self._wait(h, cookie, deadline):
                self._abandoned.append((cookie, first, end))
                return self._fell_back("the target did not answer within %gs" % self._timeout)
        except nbd.Error as e:
            raise self._failed(h, e, "write-through to") from None
        self._written = True
        return True

    def _apply_file(self, kind, offset, length, buf):
        if self._file is None:
            from ..backends import open_backend
            self._file = open_backend(self.address, readonly=False)
        if kind == "write":
            self._file.write(buf, offset)
        else:
            self._file.zero(offset, length, may_trim=(kind == "trim"))
        self._written = True
        return True

    def _fell_back(self, why):
        self.fallbacks += 1
        if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
            log.warning("Mirror write-through falls back to the background copy target=%s "
                        "reason=%s count=%d", redact(self.address), why, self.fallbacks)
        return False

    def _is_nbd(self):
        from ..backends import is_nbd_uri
        return is_nbd_uri(self.address)

    @property
    def _nbd(self):
        import nbd
        return nbd

    def _connection(self, deadline):
        """The connected handle, or None if it is not there by the deadline
        (the connect goes on in the background)."""
        if self._h is not None and is_finished(self._h):
            self._hang_up_locked()
        if self._h is not None:
            return self._h
        if self._attempt is None:
            if self._clock() < self._next_attempt:
                return None
            # Only the change that starts a connect waits for it.
            self._attempt = Attempt(self.address, "mirror-through", meta=False)
            wait = max(0.0, deadline - self._clock())
        else:
            wait = 0.0
        if not self._attempt.wait(wait):
            return None
        attempt, self._attempt = self._attempt, None
        try:
            self._h = attempt.take()
        except OSError as e:
            # Unreachable, refused, silent: the job's own connection finds out
            # too, and its reconnect-delay and policy decide; changes fall back.
            log.info("Mirror write-through cannot connect target=%s error=%s",
                     redact(self.address), e)
            self._next_attempt = self._clock() + RETRY_CONNECT
            return None
        return self._h

    def _wait(self, h, cookie, deadline):
        while not h.aio_command_completed(cookie):
            left = deadline - self._clock()
            if left <= 0:
                return False
            h.poll(max(1, int(min(left, 0.1) * 1000)))
        return True

    # -- the job thread ----------------------------------------------------

    def blocks(self, first, end):
        """True while a timed-out write-through over these granules may still land."""
        return any(f < end and first < e for _, f, e in self._abandoned)

    def reap(self):
        """Collect late answers to abandoned requests (never waits)."""
        if self._abandoned and self._lock.acquire(blocking=False):
            try:
                self._reap_locked()
            finally:
                self._lock.release()

    def _reap_locked(self):
        if not self._abandoned:
            return
        h = self._h
        if h is None or is_finished(h):
            # A connection that ended carries nothing more to the target.
            self._abandoned.clear()
            self._hang_up_locked()
            return
        nbd = self._nbd
        try:
            h.poll(0)
        except nbd.Error:
            pass
        still = []
        for cookie, first, end in self._abandoned:
            try:
                if not h.aio_command_completed(cookie):
                    still.append((cookie, first, end))
            except nbd.Error:
                # It failed late: the range is dirty anyway (it fell back).
                pass
        self._abandoned = still
        if is_finished(h):
            self._abandoned.clear()
            self._hang_up_locked()

    @property
    def connected(self):
        with self._lock:
            return self._h is not None or self._file is not None

    def flush(self):
        """Flush the write-through connection (a flush on another connection
        does not cover it unless the target offers multi-conn).

        True if flushed (or nothing to flush); False if the target did not
        answer in time (the caller copies the covered ranges again);
        raises OSError for an error.
        """
        deadline = self._clock() + self._timeout
        if not self._lock.acquire(timeout=self._timeout):
            return False
        try:
            if not self._written:
                return True
            if self._file is not None:
                self._file.flush()
                self._written = False
                return True
            h = self._h
            if h is None:
                return True
            self._reap_locked()
            if self._abandoned:
                return False
            nbd = self._nbd
            try:
                cookie = h.aio_flush()
                if not self._wait(h, cookie, deadline):
                    self._abandoned.append((cookie, 0, 0))
                    return False
            except nbd.Error as e:
                raise self._failed(h, e, "flush of") from None
            self._written = False
            return True
        finally:
            self._lock.release()

    def drop(self):
        """Close the connection (it failed, or the job ends); never waits for the target."""
        got = self._lock.acquire(timeout=self._timeout)
        try:
            self._abandoned.clear()
            self._hang_up_locked()
            if self._attempt is not None:
                self._attempt.cancel()
                self._attempt = None
            if self._file is not None:
                self._file.close()
                self._file = None
        finally:
            if got:
                self._lock.release()

    def _failed(self, h, e, what):
        """The OSError for a libnbd error on h; a finished connection is hung up (ENOTCONN)."""
        err = nbd_errno(e)
        if is_finished(h, err):
            self._hang_up_locked()
            err = errno.ENOTCONN
        return OSError(err, "%s %s: %s" % (what, redact(self.address), e))

    def _hang_up_locked(self):
        h, self._h = self._h, None
        hang_up(h)
