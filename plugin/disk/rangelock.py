"""A lock on ranges of clusters (or granules): overlapping ranges exclude each other.

Every client write takes one (the store), and so does every copy a job starts
(the copy pipeline), so the free case is the fast one: a plain lock, a scan of
the ranges held, no condition variable.  Only a range that must wait sleeps on
the condition, and a release wakes sleepers only when there are some.
"""

import contextlib
import threading


class RangeLock:
    """Excludes overlapping [first, end) ranges of clusters from each other."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._held = {}           # token -> (first, end)
        self._sleepers = 0        # threads waiting in acquire()

    def _free(self, first, end):
        for f, e in self._held.values():
            if f < end and first < e:
                return False
        return True

    def try_acquire(self, first, end):
        """Hold [first, end) if no held range overlaps it: a token, else None (never waits)."""
        with self._lock:
            if not self._free(first, end):
                return None
            token = object()
            self._held[token] = (first, end)
        return token

    def acquire(self, first, end, timeout=None):
        """Wait until no held range overlaps [first, end), then hold it; returns a
        token, or None if timeout seconds passed first."""
        with self._lock:
            if not self._free(first, end):
                self._sleepers += 1
                try:
                    if not self._cond.wait_for(lambda: self._free(first, end), timeout):
                        return None
                finally:
                    self._sleepers -= 1
            token = object()
            self._held[token] = (first, end)
        return token

    def release(self, token):
        with self._lock:
            del self._held[token]
            if self._sleepers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, first, end):
        token = self.acquire(first, end)
        try:
            yield
        finally:
            self.release(token)
