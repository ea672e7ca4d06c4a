"""An NBD export as a backend, through libnbd."""

import errno
import logging
import queue
import threading

from ..core.extent import Extent, append_merged

log = logging.getLogger(__name__)


def nbd_errno(e):
    """libnbd's Error carries the errno as a name ("ENOSPC"); map it to the number."""
    name = getattr(e, "errno", None)
    if isinstance(name, int):
        return name
    return getattr(errno, name, errno.EIO) if name else errno.EIO


class NbdBackend:
    """An NBD export through libnbd, with a small pool of connections.

    libnbd handles are thread safe but run one synchronous command at a time, so
    concurrent readers each take a connection from the pool.  A writable backend
    uses one connection unless the server offers multi-conn (otherwise a flush on
    one connection would not cover writes made on another).
    """

    def __init__(self, uri, readonly, connections=1):
        import nbd  # only here: unit tests of other modules need no libnbd
        self._nbd = nbd
        self.address = uri
        self._pool = queue.LifoQueue()
        self._handles = []
        self._lock = threading.Lock()
        first = self._connect()
        self._size = first.get_size()
        self._zero_ok = bool(first.can_zero()) if not readonly else False
        self._extents_ok = bool(first.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        multi = readonly or bool(first.can_multi_conn())
        self._max = max(1, connections if multi else 1)
        self._pool.put(first)
        log.info("open backend kind=nbd uri=%s size=%d readonly=%s connections=%d",
                 uri, self._size, readonly, self._max)

    def _connect(self):
        h = self._nbd.NBD()
        h.set_handle_name("overlay")
        h.add_meta_context(self._nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_uri(self.address)
        except self._nbd.Error as e:
            raise OSError(nbd_errno(e), "cannot connect to %s: %s" % (self.address, e)) from None
        with self._lock:
            self._handles.append(h)
        return h

    def _call(self, fn, retry=False):
        """Run fn(handle) on a pooled connection; a dead connection is replaced.

        With retry=True (reads, extents: no durability at stake) a command that
        failed because the connection died runs once more on a new connection,
        so a restarted NBD server is picked up transparently.  Writes and
        flushes report the failure; the next call reconnects.
        """
        try:
            h = self._pool.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = len(self._handles) < self._max
            h = self._connect() if grow else self._pool.get()
        try:
            return fn(h)
        except self._nbd.Error as e:
            if not (h.aio_is_dead() or h.aio_is_closed()):
                raise OSError(nbd_errno(e), str(e)) from None
            log.warning("NBD connection lost uri=%s error=%s", self.address, e)
            self._forget(h)
            h = None
            if not retry:
                raise OSError(nbd_errno(e), str(e)) from None
            h = self._connect()
            try:
                return fn(h)
            except self._nbd.Error as e2:
                raise OSError(nbd_errno(e2), str(e2)) from None
        finally:
            if h is not None:
                self._pool.put(h)

    def _forget(self, h):
        with self._lock:
            if h in self._handles:
                self._handles.remove(h)

    def size(self):
        return self._size

    def readinto(self, buf, offset):
        data = self._call(lambda h: h.pread(len(buf), offset), retry=True)
        memoryview(buf)[:] = data

    def write(self, buf, offset, fua=False):
        flags = self._nbd.CMD_FLAG_FUA if fua else 0
        self._call(lambda h: h.pwrite(bytes(buf), offset, flags))

    def zero(self, offset, length, may_trim=False, fua=False):
        if not self._zero_ok:
            zeros = bytes(min(length, 1 << 20))
            while length:
                n = min(length, len(zeros))
                self.write(memoryview(zeros)[:n], offset, fua)
                offset += n
                length -= n
            return
        flags = 0 if may_trim else self._nbd.CMD_FLAG_NO_HOLE
        if fua:
            flags |= self._nbd.CMD_FLAG_FUA
        self._call(lambda h: h.zero(length, offset, flags))

    def flush(self):
        self._call(lambda h: h.flush())

    def extents(self, offset, length):
        return nbd_extents(lambda fn: self._call(fn, retry=True), offset, length, self._size,
                           self._extents_ok)

    def close(self):
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            try:
                h.shutdown()
            except self._nbd.Error:
                pass
        # libnbd closes each handle when the last reference goes.
        while not self._pool.empty():
            self._pool.get_nowait()


def nbd_extents(call, offset, length, size, extents_ok):
    """[Extent] of an NBD export, covering the range.

    call(fn) runs fn(handle) on a connection and turns libnbd errors into
    OSError.  Without base:allocation everything is data; past the end of the
    export everything reads as zeros.
    """
    import nbd
    end = min(offset + length, size)
    result = []
    if not extents_ok:
        if end > offset:
            result.append(Extent(offset, end - offset, False))
    pos = offset
    while extents_ok and pos < end:
        got = []

        def extent(metacontext, start, entries, err):
            if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        count = min(end - pos, 1 << 30)
        call(lambda h: h.block_status(count, pos, extent))
        if not got:
            raise OSError(errno.EIO, "server returned no extents at %d" % pos)
        for i in range(0, len(got), 2):
            n = min(got[i], end - pos)
            zero = bool(got[i + 1] & nbd.STATE_ZERO)
            append_merged(result, pos, n, zero)
            pos += n
            if pos >= end:
                break
    if offset + length > end:
        start = max(end, offset)
        result.append(Extent(start, offset + length - start, True))
    return result
