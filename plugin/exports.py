"""Named NBD exports beside the disk: a pull-mode backup's point-in-time view.

nbdkit serves every export name on the disk's socket; the entry script asks
the table which name a new connection wants.  A name the table holds gets a
read-only :class:`ViewDisk` over the view (plugin/blockcopy/snapshot.py);
any other name gets the disk itself, as before (clients that send an
arbitrary export name keep working).
"""

import errno
import threading


class ExportTable:
    def __init__(self):
        self._views = {}
        self._lock = threading.Lock()

    def add(self, name, view):
        with self._lock:
            self._views[name] = view

    def remove(self, name):
        with self._lock:
            self._views.pop(name, None)

    def get(self, name):
        with self._lock:
            return self._views.get(name)

    def names(self):
        with self._lock:
            return sorted(self._views)


class ViewDisk:
    """What a connection to a view export sees: the disk's request methods,
    reading the point in time, refusing changes."""

    writable = False

    def __init__(self, view, disk):
        self._view = view
        self.size = view.size
        self.store = disk.store           # block sizes: the disk's cluster size
        self.read = view.read_locked

    def write(self, buf, offset, fua=False):
        raise OSError(errno.EROFS, "a point-in-time export is read-only")

    def zero(self, offset, length, **flags):
        raise OSError(errno.EROFS, "a point-in-time export is read-only")

    def trim(self, offset, length, fua=False):
        raise OSError(errno.EROFS, "a point-in-time export is read-only")

    def flush(self):
        """Nothing to make durable: the view never changes."""

    def cache(self, offset, length):
        """Reads of the view need no warming."""

    def extents(self, offset, length, req_one=False):
        extents = self._view.extents(offset, length)
        return extents[:1] if req_one else extents
