"""A lock on ranges of clusters (or granules): overlapping ranges exclude each other."""

import contextlib
import threading


class RangeLock:
    """Excludes overlapping [first, end) ranges of clusters from each other."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = []

    def acquire(self, first, end, timeout=None):
        """Wait until no held range overlaps [first, end), then hold it; returns a
        token, or None if timeout seconds passed first."""
        token = (first, end, object())
        with self._cond:
            if not self._cond.wait_for(
                    lambda: not any(f < end and first < e for f, e, _ in self._held), timeout):
                return None
            self._held.append(token)
        return token

    def release(self, token):
        with self._cond:
            self._held.remove(token)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, first, end):
        token = self.acquire(first, end)
        try:
            yield
        finally:
            self.release(token)
