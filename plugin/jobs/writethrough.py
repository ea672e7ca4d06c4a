"""copy-mode=write-blocking: client changes go to the mirror target synchronously.

The mirror's disk listener calls :meth:`WriteThrough.apply` in the client's
thread after the change completed on the disk; it holds the mirror's range
lock over the granules it touches, so a background copy of an overlapping
range (which holds the same lock while in flight) can never land after it.
The connection is opened on first use and dropped after an error; the next
change opens a new one.
"""

import threading

from ..backends import open_backend


class WriteThrough:
    def __init__(self, address, ranges, granularity):
        self.address = address
        self._ranges = ranges
        self._granularity = granularity
        self._backend = None
        self._lock = threading.Lock()

    def apply(self, kind, offset, length, buf):
        """Write ("write", with buf), zero or trim the range on the target; raises OSError."""
        g = self._granularity
        token = self._ranges.acquire(offset // g, (offset + length + g - 1) // g)
        try:
            backend = self._connection()
            if kind == "write":
                backend.write(buf, offset)
            else:
                backend.zero(offset, length, may_trim=(kind == "trim"))
        finally:
            self._ranges.release(token)

    def _connection(self):
        with self._lock:
            if self._backend is None:
                self._backend = open_backend(self.address, readonly=False)
            return self._backend

    @property
    def connected(self):
        with self._lock:
            return self._backend is not None

    def flush(self):
        """Flush the write-through connection, if open (a flush on another
        connection does not cover it unless the target offers multi-conn)."""
        with self._lock:
            backend = self._backend
        if backend is not None:
            backend.flush()

    def drop(self):
        """Close the connection (it failed, or the job ends)."""
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
