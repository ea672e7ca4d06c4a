"""copy-mode=write-blocking: client changes go to the copy target synchronously.

The mirror's disk listener calls :meth:`WriteThrough.apply` in the client's
thread after the change completed on the disk; it holds the copy's range
lock over the granules it touches, so a background copy of an overlapping
range (which holds the same lock while in flight) can never land after it.

A client never waits longer than ``timeout`` (THROUGH_TIMEOUT) for the
target: not for the range lock, the connection (opened in the background
on first use, or again after it was lost) or the request.  Past it the
change *falls back*: apply() returns False and the mirror marks the range
dirty for its background copy.  A request that timed out may still land
later, so the channel (backends/through.py) remembers it until the target
answers, and the job copies nothing over its granules meanwhile
(:meth:`blocks`); while anything is abandoned, changes fall back at once.
The job thread calls :meth:`reap` to collect those late answers.  A real
error (the target answered with an errno, or the connection died) raises
OSError: the job's policy applies; a connect that fails falls back (the
job's own connection and its reconnect-delay decide about a target that is
gone).

A forced cancel must free client I/O at once, whatever the target does
(issue 24: a SIGSTOPped target held client writes for about a second after
the cancel).  So every wait here (the range lock, the channel's lock, the
connect, the target's answer) is taken in short slices and ends as soon as
``stopped()`` says the job is going away; the change then falls back.
"""

import logging
import threading
import time

from ..backends import open_through, redact

log = logging.getLogger(__name__)

# The longest a client change waits for the target in write-blocking mode.
THROUGH_TIMEOUT = 2.0
# How often a waiting client change looks whether the job is going away.
STOP_SLICE = 0.05


class WriteThrough:
    def __init__(self, address, ranges, granularity, timeout=THROUGH_TIMEOUT,
                 clock=time.monotonic, stopped=lambda: False):
        self.address = address
        self._stopped = stopped           # True once the job is going away (forced cancel)
        self._ranges = ranges
        self._granularity = granularity
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()     # one channel, one request at a time
        self._channel = None              # opened on first use, dropped on failure
        self.fallbacks = 0

    # -- client threads ----------------------------------------------------

    def apply(self, kind, offset, length, buf):
        """Write ("write", with buf), zero or trim the range on the target.

        True if done, False if it fell back (the caller marks the range
        dirty); raises OSError for an error the target gave.
        """
        if self._stopped():
            return self._fell_back("the job is going away")
        deadline = self._clock() + self._timeout
        g = self._granularity
        first, end = offset // g, (offset + length + g - 1) // g
        token = self._sliced(lambda t: self._ranges.acquire(first, end, timeout=t),
                             self._timeout)
        if token is None:
            return self._fell_back("a background copy of the range is still in flight")
        try:
            if not self._sliced(lambda t: self._lock.acquire(timeout=t),
                                max(0.0, deadline - self._clock())):
                return self._fell_back("another write-through is waiting for the target")
            try:
                if self._stopped():
                    why = "the job is going away"
                else:
                    if self._channel is None:
                        self._channel = open_through(self.address, self._clock)
                    why = self._channel.write(kind, offset, length, buf, deadline,
                                              self._stopped)
            finally:
                self._lock.release()
        finally:
            self._ranges.release(token)
        return True if why is None else self._fell_back(why)

    def _sliced(self, acquire, timeout):
        """acquire(seconds) in STOP_SLICE steps for up to timeout seconds (real
        time); gives up early once the job is going away.  Returns what the
        last acquire returned."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            got = acquire(max(0.0, min(left, STOP_SLICE)))
            if got or left <= STOP_SLICE or self._stopped():
                return got

    def _fell_back(self, why):
        self.fallbacks += 1
        if self.fallbacks == 1 or self.fallbacks % 1000 == 0:
            log.warning("Mirror write-through falls back to the background copy target=%s "
                        "reason=%s count=%d", redact(self.address), why, self.fallbacks)
        return False

    # -- the job thread ----------------------------------------------------

    def blocks(self, first, end):
        """True while a timed-out write-through over these granules may still land."""
        channel = self._channel
        if channel is None:
            return False
        # No lock: a client may hold it for up to the timeout, and the job
        # thread must not wait for the target.  The channel's record of
        # abandoned requests is replaced or appended to atomically.
        g = self._granularity
        return channel.overlaps(first * g, (end - first) * g)

    def reap(self):
        """Collect late answers to abandoned requests (never waits)."""
        if self._channel is not None and self._lock.acquire(blocking=False):
            try:
                if self._channel is not None:
                    self._channel.reap()
            finally:
                self._lock.release()

    @property
    def connected(self):
        with self._lock:
            return self._channel is not None and self._channel.connected

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
            if self._channel is None:
                return True
            return self._channel.flush(deadline) is None
        finally:
            self._lock.release()

    def drop(self):
        """Close the channel (it failed, or the job ends); never waits for the target."""
        got = self._lock.acquire(timeout=self._timeout)
        try:
            channel, self._channel = self._channel, None
            if channel is not None:
                channel.close()
        finally:
            if got:
                self._lock.release()
