"""Asynchronous writes to a mirror target, many requests in flight.

The mirror thread submits writes, zeroes and flushes tagged with what they
cover, then collects completions with wait(), so that a stalled target never
blocks the thread (cancel stays prompt).  Only the mirror thread calls these
methods, so an NBD target is one libnbd handle driven by aio_* calls and
poll() (no completion callbacks: nothing runs inside libnbd's locks).  A raw
file target uses a small thread pool of pwrite()s (they release the GIL).

A failed request comes back from wait() with its errno; the caller decides
what it means (the job's error policy).  Nothing is ever dropped: a request
that could not even be sent (the connection is dead or gone) comes back as a
failed completion too, and so do requests still pending on a connection that
reconnect() replaces.  A target whose connection died is reopened by
reconnect(), so a restarted target server lets the job go on; errors seen on
a dead connection are reported as ENOTCONN, whatever libnbd's own text says.
"""

import concurrent.futures
import errno
import logging
import os
import socket

from ..core.errors import errno_of
from .file import FileBackend
from .nbd import nbd_errno, nbd_extents

log = logging.getLogger(__name__)

MAX_ZERO = 1 << 30        # NBD requests carry a 32-bit length


class FileTarget:
    """A raw file or block device, written by a few threads."""

    # fdatasync covers writes made through any descriptor of the file.
    multi_conn = True

    def __init__(self, path, workers=4):
        self.address = path
        self._backend = FileBackend(path, readonly=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mirror-io")
        self._pending = {}

    def size(self):
        return self._backend.size()

    def extents(self, offset, length):
        return self._backend.extents(offset, length)

    def in_flight(self):
        return len(self._pending)

    def submit_write(self, buf, offset, tag):
        fut = self._pool.submit(self._backend.write, buf, offset)
        self._pending[fut] = tag

    def submit_zero(self, offset, length, tag):
        fut = self._pool.submit(self._backend.zero, offset, length, True)
        self._pending[fut] = tag

    def submit_flush(self, tag):
        """Flush what completed before this call (fdatasync covers the whole file)."""
        fut = self._pool.submit(self._backend.flush)
        self._pending[fut] = tag

    def wait(self, timeout):
        """Completions so far (waiting up to timeout for one): [(tag, errno or 0)]."""
        if not self._pending:
            return []
        done, _ = concurrent.futures.wait(self._pending, timeout,
                                          concurrent.futures.FIRST_COMPLETED)
        result = []
        for fut in done:
            tag = self._pending.pop(fut)
            exc = fut.exception()
            result.append((tag, errno_of(exc) if exc else 0))
        return result

    def reconnect(self):
        """Files do not disconnect: never a new connection (False)."""
        return False

    def close(self):
        self._pool.shutdown(wait=True)
        self._backend.close()


class NbdTarget:
    """An NBD export through one libnbd handle, asynchronously."""

    def __init__(self, uri):
        import nbd
        self._nbd = nbd
        self.address = uri
        self._pending = {}           # cookie -> (tag, buffer kept alive)
        self._failed = []            # [(tag, errno)] that wait() returns next
        self._h = None
        self._connect()

    def _connect(self):
        nbd = self._nbd
        h = nbd.NBD()
        h.set_handle_name("mirror-target")
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_uri(self.address)
        except nbd.Error as e:
            raise OSError(nbd_errno(e),
                          "cannot connect to %s: %s" % (self.address, e)) from None
        if h.is_read_only():
            raise OSError(errno.EROFS, "target %s is read-only" % self.address)
        self._h = h
        _grow_send_buffer(h.aio_get_fd())
        self._size = h.get_size()
        self._can_zero = bool(h.can_zero())
        self.multi_conn = bool(h.can_multi_conn())
        log.info("Mirror target connected uri=%s size=%d", self.address, self._size)

    def size(self):
        return self._size

    def extents(self, offset, length):
        """Synchronous block status on the job's connection (only used at start)."""
        ok = bool(self._h.can_meta_context(self._nbd.CONTEXT_BASE_ALLOCATION))
        return nbd_extents(lambda fn: self._guard(lambda: fn(self._h)),
                                    offset, length, self._size, ok)

    def _connected(self):
        return self._h is not None and not self._h.aio_is_dead() and not self._h.aio_is_closed()

    def _errno(self, e):
        # A dead connection refuses commands with EINVAL-like errors: say what happened.
        if not self._connected():
            return errno.ENOTCONN
        return nbd_errno(e)

    def _guard(self, fn):
        if self._h is None:
            raise OSError(errno.ENOTCONN, "not connected to %s" % self.address)
        try:
            return fn()
        except self._nbd.Error as e:
            raise OSError(self._errno(e), str(e)) from None

    def in_flight(self):
        return len(self._pending) + len(self._failed)

    def _submit(self, tag, send, keep=None):
        """Send one request (send(handle) -> cookie); a failure to send is a completion."""
        if self._h is None:
            self._failed.append((tag, errno.ENOTCONN))
            return
        try:
            cookie = send(self._h)
        except self._nbd.Error as e:
            self._failed.append((tag, self._errno(e)))
            return
        self._pending[cookie] = (tag, keep)

    def submit_write(self, buf, offset, tag):
        abuf = self._nbd.Buffer.from_buffer(buf)
        self._submit(tag, lambda h: h.aio_pwrite(abuf, offset), abuf)

    def submit_zero(self, offset, length, tag):
        if not self._can_zero:
            self.submit_write(bytearray(length), offset, tag)
            return
        self._submit(tag, lambda h: h.aio_zero(length, offset))

    def submit_flush(self, tag):
        """Flush the writes that completed before this call."""
        self._submit(tag, lambda h: h.aio_flush())

    def wait(self, timeout):
        """Completions so far (polling up to timeout for one): [(tag, errno or 0)]."""
        result = self._collect()
        if result or not self._pending:
            return result
        try:
            if self._connected():
                self._h.poll(int(timeout * 1000))
        except self._nbd.Error as e:
            log.warning("Mirror target poll failed uri=%s error=%s", self.address, e)
        return self._collect()

    def _collect(self):
        result, self._failed = self._failed, []
        if not self._pending:
            return result
        dead = not self._connected()
        for cookie in list(self._pending):
            tag, _ = self._pending[cookie]
            try:
                done = self._h.aio_command_completed(cookie)
            except self._nbd.Error as e:
                del self._pending[cookie]
                result.append((tag, self._errno(e) if dead else
                               nbd_errno(e) or errno.EIO))
                continue
            if done:
                del self._pending[cookie]
                result.append((tag, 0))
            elif dead:
                del self._pending[cookie]
                result.append((tag, errno.ENOTCONN))
        return result

    def reconnect(self):
        """Open a new connection if the old one died.

        Returns True if a new connection was made (writes acknowledged on
        the old one but not flushed may be lost: the caller copies them
        again), False if the connection is fine.  Requests still pending on
        a dead connection come back from wait() as ENOTCONN.  Raises OSError
        if the server cannot be reached (call again later).
        """
        if self._connected():
            return False
        if self._h is not None:
            log.info("Mirror target connection lost uri=%s pending=%d", self.address,
                     len(self._pending))
            self._failed += [(tag, errno.ENOTCONN) for tag, _ in self._pending.values()]
            self._pending.clear()
            self._h = None           # libnbd closes the handle when it is collected
        self._connect()
        return True

    def close(self):
        """Drop the connection; requests still in flight are abandoned."""
        if self._h is not None:
            try:
                if not self._h.aio_is_dead() and not self._h.aio_in_flight():
                    self._h.shutdown()
            except self._nbd.Error:
                pass
            self._h = None          # libnbd closes the handle when it is collected
        self._pending.clear()
        self._failed.clear()


SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32


def _grow_send_buffer(fd):
    """Let the kernel take a whole chunk at submit time.

    Our one thread reads the source and drives the connection; with the default
    ~200 KiB socket buffer the target idles while we read the next chunk.  A
    larger buffer lets each aio_pwrite hand its data to the kernel at once, so
    the target works while we read.  SO_SNDBUFFORCE (root) passes wmem_max.
    """
    sock = socket.socket(fileno=os.dup(fd))
    try:
        for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
                return
            except OSError:
                continue
    finally:
        sock.close()
