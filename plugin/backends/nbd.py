"""An NBD export as a backend, through libnbd."""

import errno
import logging
import queue
import threading
import time

from ..core.extent import Extent, append_merged
from .nbdconnect import connect, hang_up, is_finished, nbd_errno, redact

log = logging.getLogger(__name__)

__all__ = ["NbdBackend", "nbd_errno", "nbd_extents"]

# Within reconnect-delay, a failed reconnect is tried again this often.
RECONNECT_INTERVAL = 0.25


class NbdBackend:
    """An NBD export through libnbd, with a small pool of connections.

    libnbd handles are thread safe but run one synchronous command at a time, so
    concurrent readers each take a connection from the pool.  A writable backend
    uses one connection unless the server offers multi-conn (otherwise a flush on
    one connection would not cover writes made on another).

    A connection that is finished (dead, closed, or answering ESHUTDOWN) is
    replaced.  Within ``reconnect_delay`` seconds of the loss the request
    waits and runs again on the new connection; after it the request fails.
    Reads and block status are always tried once more on a new connection
    (a restarted server is picked up at once).

    ``handle``: an already connected libnbd handle to adopt as the first
    connection (a mirror's target connection handed over at the pivot: a
    server that takes one client, as qemu-nbd by default, accepts no other).
    """

    def __init__(self, uri, readonly, connections=1, reconnect_delay=0.0, handle=None):
        import nbd  # only here: unit tests of other modules need no libnbd
        self._nbd = nbd
        self.address = uri
        self.reconnect_delay = reconnect_delay
        self._pool = queue.LifoQueue()
        self._handles = []
        self._lock = threading.Lock()
        if handle is not None:
            with self._lock:
                self._handles.append(handle)
            first = handle
        else:
            first = self._connect()
        self._size = first.get_size()
        if not readonly and first.is_read_only():
            hang_up(first)
            raise OSError(errno.EROFS, "%s is read-only" % redact(uri))
        self._zero_ok = bool(first.can_zero()) if not readonly else False
        self._extents_ok = bool(first.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        multi = readonly or bool(first.can_multi_conn())
        self._max = max(1, connections if multi else 1)
        self._pool.put(first)
        log.info("open backend kind=nbd uri=%s size=%d readonly=%s connections=%d "
                 "reconnect_delay=%s", redact(uri), self._size, readonly, self._max,
                 reconnect_delay)

    def _connect(self):
        h = connect(self.address, "overlay")
        with self._lock:
            self._handles.append(h)
        return h

    def _call(self, fn, retry=False):
        """Run fn(handle) on a pooled connection; a finished connection is replaced.

        Within reconnect_delay of a lost connection every command waits for
        a new one and runs again (the NBD commands we send are idempotent).
        Otherwise, with retry=True (reads, extents: no durability at stake)
        a command runs once more on a new connection; writes and flushes
        report the failure and the next call reconnects.
        """
        try:
            h = self._pool.get_nowait()
        except queue.Empty:
            with self._lock:
                grow = len(self._handles) < self._max
            h = self._grow() if grow else self._pool.get()
        lost_at = None
        try:
            while True:
                try:
                    return fn(h)
                except self._nbd.Error as e:
                    err = nbd_errno(e)
                    if not is_finished(h, err):
                        raise OSError(err, str(e)) from None
                    log.warning("NBD connection lost uri=%s error=%s", redact(self.address), e)
                    self._forget(h)
                    h = None
                    if lost_at is None:
                        lost_at = time.monotonic()
                    if not (retry or self._within(lost_at)):
                        raise OSError(err, str(e)) from None
                    retry = False
                h = self._reconnect(lost_at)
        finally:
            if h is not None:
                self._pool.put(h)

    def _grow(self):
        """One more connection.  One that cannot be made now means the server went
        away (the others just have not noticed yet): within reconnect_delay, wait
        for it as for a lost connection."""
        try:
            return self._connect()
        except OSError:
            if not self.reconnect_delay:
                raise
            return self._reconnect(time.monotonic())

    def _within(self, lost_at):
        return time.monotonic() - lost_at < self.reconnect_delay

    def _reconnect(self, lost_at):
        """A new connection, trying again until reconnect_delay after lost_at is over."""
        while True:
            try:
                return self._connect()
            except OSError:
                if not self._within(lost_at):
                    raise
            time.sleep(RECONNECT_INTERVAL)

    def _forget(self, h):
        with self._lock:
            if h in self._handles:
                self._handles.remove(h)
        hang_up(h)

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
        """Hang up every connection without waiting for the server (it may be stalled)."""
        with self._lock:
            handles, self._handles = self._handles, []
        for h in handles:
            hang_up(h, grace=0.5)
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
