"""The served disk: what NBD clients read and write.

Today it is the overlay store; jobs add themselves as write listeners (mirror's
dirty bitmap) and are told about every completed change of the disk's content.
A listener runs after the change completed, so a job that copies a range and
then sees the range dirtied will copy it again.
"""

import logging
import threading

log = logging.getLogger(__name__)


class Disk:
    """The disk named `device`, backed by an OverlayStore."""

    def __init__(self, store, device):
        self.store = store
        self.device = device
        self.size = store.size
        self._listeners = ()
        self._lock = threading.Lock()

    # -- listeners (jobs) -------------------------------------------------

    def add_listener(self, fn):
        """Call fn(offset, length) after every completed write, zero or trim."""
        with self._lock:
            self._listeners = self._listeners + (fn,)

    def remove_listener(self, fn):
        with self._lock:
            self._listeners = tuple(f for f in self._listeners if f is not fn)

    def _changed(self, offset, length):
        for fn in self._listeners:
            fn(offset, length)

    # -- NBD requests -----------------------------------------------------

    def read(self, buf, offset):
        self.store.read(buf, offset)

    def write(self, buf, offset, fua=False):
        self.store.write(buf, offset, fua)
        if self._listeners:
            self._changed(offset, len(buf))

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self.store.zero(offset, length, may_trim, fast, fua)
        if self._listeners:
            self._changed(offset, length)

    def trim(self, offset, length, fua=False):
        self.store.trim(offset, length, fua)
        if self._listeners:
            self._changed(offset, length)

    def flush(self):
        self.store.flush()

    def extents(self, offset, length, req_one=False):
        return self.store.extents(offset, length, req_one)

    def cache(self, offset, length):
        self.store.cache(offset, length)

    def close(self):
        self.store.close()
