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
        self._changed = threading.Condition(self._lock)
        self._waiters: dict = {}    # cond -> waits in progress on it
        self._begun = 0             # waits begun so far

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        # Any notify on cond (a kick, a pause) or an advance() ends the wait;
        # callers re-check their deadline against now().  The caller holds
        # cond, so an advance() from now on cannot miss this wait.
        with self._lock:
            self._waiters[cond] = self._waiters.get(cond, 0) + 1
            self._begun += 1
            self._changed.notify_all()
        try:
            cond.wait()
        finally:
            with self._lock:
                self._waiters[cond] -= 1
                if not self._waiters[cond]:
                    del self._waiters[cond]

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
            return sum(self._waiters.values())

    def waits_begun(self) -> int:
        """How many waits have begun so far (see wait_for_waits)."""
        with self._lock:
            return self._begun

    def wait_for_waits(self, count: int, timeout: float) -> bool:
        """Block until `count` waits have begun, up to `timeout` real seconds.

        A test that advanced the clock knows the job has done what that time
        allowed once the job waits again: ``n = waits_begun(); advance(dt);
        wait_for_waits(n + 1, ...)`` (one sleeping thread).
        """
        with self._changed:
            return self._changed.wait_for(lambda: self._begun >= count, timeout)


MONOTONIC = MonotonicClock()
