"""Storage backends: a raw file or an NBD export behind one small interface.

The base, the mirror target and a pivoted disk are all backends, so code above
never asks which kind it has (as ovirt-imageio's backends do):

    size()                              bytes
    readinto(buf, offset)               fill all of buf
    write(buf, offset, fua=False)
    zero(offset, length, may_trim=False, fua=False)
    flush()
    extents(offset, length)             [(offset, length, reads_as_zero)], covering the range
    close()

Errors are OSError with the errno the storage gave, so callers can tell ENOSPC
from EIO.
"""

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import threading

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    """fallocate(2), which Python's os module lacks; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def is_nbd_uri(address):
    return address.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://",
                                "nbd+vsock://"))


def open_backend(address, readonly, connections=1):
    """A backend for a file path or an NBD URI."""
    if is_nbd_uri(address):
        return NbdBackend(address, readonly, connections)
    return FileBackend(address, readonly)


def pread_all(fd, buf, offset):
    """Fill the writable buffer buf from fd at offset; raise EIO on a short file."""
    view = memoryview(buf)
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, "short read at offset %d" % offset)
        view = view[n:]
        offset += n


def pwrite_all(fd, buf, offset):
    view = memoryview(buf)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_zeroes(fd, offset, length):
    """Write zero bytes over a range (when no fallocate mode is supported)."""
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = min(length, len(chunk))
        pwrite_all(fd, memoryview(chunk)[:n], offset)
        offset += n
        length -= n


class FileBackend:
    """A raw image file (or block device)."""

    def __init__(self, path, readonly):
        self.address = path
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(path, flags)
        st = os.fstat(self._fd)
        self._size = st.st_size
        if self._size == 0 and not os.path.isfile(path):
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        log.info("open backend kind=file path=%s size=%d readonly=%s", path, self._size, readonly)

    def size(self):
        return self._size

    def readinto(self, buf, offset):
        pread_all(self._fd, buf, offset)

    def write(self, buf, offset, fua=False):
        pwrite_all(self._fd, buf, offset)
        if fua:
            os.fdatasync(self._fd)

    def zero(self, offset, length, may_trim=False, fua=False):
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_trim else FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            write_zeroes(self._fd, offset, length)
        if fua:
            os.fdatasync(self._fd)

    def flush(self):
        os.fdatasync(self._fd)

    def extents(self, offset, length):
        end = min(offset + length, self._size)
        result = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                result.append((pos, min(data, end) - pos, True))
                pos = min(data, end)
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            result.append((pos, min(hole, end) - pos, False))
            pos = min(hole, end)
        if offset + length > end:
            result.append((max(end, offset), offset + length - max(end, offset), True))
        return result

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _nbd_errno(e):
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
            raise OSError(_nbd_errno(e), "cannot connect to %s: %s" % (self.address, e)) from None
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
                raise OSError(_nbd_errno(e), str(e)) from None
            log.warning("NBD connection lost uri=%s error=%s", self.address, e)
            self._forget(h)
            h = None
            if not retry:
                raise OSError(_nbd_errno(e), str(e)) from None
            h = self._connect()
            try:
                return fn(h)
            except self._nbd.Error as e2:
                raise OSError(_nbd_errno(e2), str(e2)) from None
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
    """[(offset, length, reads_as_zero)] of an NBD export, covering the range.

    call(fn) runs fn(handle) on a connection and turns libnbd errors into
    OSError.  Without base:allocation everything is data; past the end of the
    export everything reads as zeros.
    """
    import nbd
    end = min(offset + length, size)
    result = []
    if not extents_ok:
        if end > offset:
            result.append((offset, end - offset, False))
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
            if result and result[-1][2] == zero and result[-1][0] + result[-1][1] == pos:
                result[-1] = (result[-1][0], result[-1][1] + n, zero)
            else:
                result.append((pos, n, zero))
            pos += n
            if pos >= end:
                break
    if offset + length > end:
        start = max(end, offset)
        result.append((start, offset + length - start, True))
    return result
