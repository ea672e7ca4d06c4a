"""Time for jobs: a clock that tests can replace (as QEMU's qtest clock_step).

The engine never calls time.monotonic() or Condition.wait(timeout) itself; it
asks its clock.  :class:`MonotonicClock` is real time.  :class:`ManualClock`
stands still until a test advances it, waking every job that sleeps on it,
so rate-limit and back-off behaviour can be tested without sleeping.
"""

import threading
import time


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Wait on cond (held by the caller) for up to timeout seconds."""
        cond.wait(timeout)


class ManualClock:
    """A clock that only moves when advance() is called (for tests)."""

    def __init__(self, start: float = 1000.0):
        self._now = start
        self._lock = threading.Lock()
        self._waiters: set = set()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        # Any notify on cond (a kick, a pause) or an advance() ends the wait;
        # callers re-check their deadline against now().
        with self._lock:
            self._waiters.add(cond)
        try:
            cond.wait()
        finally:
            with self._lock:
                self._waiters.discard(cond)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            waiters = list(self._waiters)
        for cond in waiters:
            with cond:
                cond.notify_all()

    def sleepers(self) -> int:
        """How many waits are in progress (tests wait for a job to be asleep)."""
        with self._lock:
            return len(self._waiters)


MONOTONIC = MonotonicClock()
