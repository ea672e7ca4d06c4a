"""An RBD image as an asynchronous copy target (the mirror's), with librbd's aio calls.

The interface every target shares is in backends/__init__.py; the address,
the connection and the errors are rbd.py's.
"""

import errno
import logging
import queue
import threading

from ..core.errors import errno_of
from ..core.threads import Thread
from .rbd import CLOSE_WAIT, _ceph_errors, _Connection, _parse, _whole_buffer, ceph_errno

log = logging.getLogger(__name__)


class RbdTarget:
    """An RBD image as a drive-mirror target, written with librbd's aio calls.

    Completion callbacks run in librbd's threads; they only put (tag, errno)
    on a queue (never raise, never call librbd).  Only the mirror thread calls
    the methods.
    """

    # One image handle: a flush covers every write that completed before it.
    multi_conn = True

    def __init__(self, address):
        self.address = address
        self.on_loss = None                  # called when the image is reopened
        self.losses = 0
        self._addr = _parse(address)
        self._done = queue.SimpleQueue()     # (generation, serial, errno) from callbacks
        self._pending = {}                   # serial -> tag
        self._failed = []                    # (tag, errno) that wait() returns next
        self._serial = 0
        self._generation = 0                 # bumped by reconnect(): late callbacks ignored
        self._dead = False
        # Opened in the background, as an NBD target connects: librados may
        # take up to its timeout to give up on an unreachable cluster, and the
        # caller (a QMP command) must not wait that long.  wait_open() waits.
        self._c = None
        self._open_lock = threading.Lock()
        self._opened = threading.Event()
        self._open_error = None
        self._closed = False
        Thread(target=self._open_first, name="rbd-open", daemon=True).start()

    def _open_first(self):
        try:
            c = _Connection(self._addr, readonly=False)
        except OSError as e:
            self._open_error = e
        except Exception as e:          # the binding's own errors for a bad conf
            self._open_error = OSError(errno_of(e, errno.EIO), "cannot open %s: %s"
                                       % (self._addr, e))
        else:
            with self._open_lock:
                if not self._closed:
                    self._c, c = c, None
            if c is not None:           # closed while opening: nobody will use it
                c.close_within(CLOSE_WAIT)
            else:
                log.info("Mirror target opened image=%s", self._addr)
        self._opened.set()

    def size(self):
        return self._c.size

    def extents(self, offset, length):
        return self._c.extents(offset, length)

    def in_flight(self):
        return len(self._pending) + len(self._failed)

    def _callback(self, serial):
        generation, done_queue = self._generation, self._done

        def done(completion):
            try:
                ret = completion.get_return_value()
                n = 0 if ret >= 0 else (errno.ENOSPC if -ret == errno.EDQUOT else -ret)
            except BaseException:
                n = errno.EIO
            done_queue.put((generation, serial, n))
        return done

    def _submit(self, tag, method, *args):
        if self._c is None:             # a reconnect failed: reconnect() tries again
            self._failed.append((tag, errno.ENOTCONN))
            return
        fn = getattr(self._c.image, method)
        self._serial += 1
        serial = self._serial
        self._pending[serial] = tag
        try:
            fn(*args, self._callback(serial))
        except _ceph_errors() as e:
            del self._pending[serial]
            self._failed.append((tag, self._note(ceph_errno(e))))
        except Exception as e:          # e.g. the image was closed
            del self._pending[serial]
            self._failed.append((tag, self._note(errno_of(e, errno.EBADF))))

    def _note(self, n):
        if n in (errno.ESHUTDOWN, errno.ENOTCONN, errno.EBADF):
            self._dead = True           # blocklisted or closed: reconnect() reopens
        return n

    def submit_write(self, buf, offset, tag):
        """Write buf (it may be reused once this returns: librbd copies it here).

        A bytearray, or a memoryview of a whole one (the mirror's usual 1 MiB
        chunk), goes to librbd as it is; the binding takes only bytes and
        bytearray, so a partial view is copied once more.
        """
        self._submit(tag, "aio_write", _whole_buffer(buf), offset)

    def submit_zero(self, offset, length, tag):
        self._submit(tag, "aio_write_zeroes", offset, length)

    def submit_flush(self, tag):
        """Flush the writes that completed before this call."""
        self._submit(tag, "aio_flush")

    def wait(self, timeout):
        """Completions so far (waiting up to timeout for one): [(tag, errno or 0)]."""
        result, self._failed = self._failed, []
        block = not result and bool(self._pending)
        while True:
            try:
                item = self._done.get(timeout=timeout) if block else self._done.get_nowait()
            except queue.Empty:
                break
            generation, serial, n = item
            if generation == self._generation and serial in self._pending:
                result.append((self._pending.pop(serial), self._note(n)))
                block = False
        return result

    def wait_open(self, timeout):
        """Wait up to timeout for the image to open: True when open, False if still
        opening; raises the OSError of a failed open (librados' timeout bounds it)."""
        if not self._opened.wait(timeout):
            return False
        if self._open_error is not None:
            raise self._open_error
        return True

    def detach(self):
        """Nothing to hand over: the pivot opens the image itself (librbd's
        exclusive lock moves to the new handle)."""
        return None

    def reconnect(self, timeout=0.0):
        """After errors: True if the image is usable now, reopening it if the client
        was shut out (blocklisted) or closed; False if it cannot be opened yet.

        The copy target interface (backends/__init__.py): a reopen counts as a
        lost connection (on_loss: what was acknowledged but not flushed is
        copied again).
        """
        if not self._dead and self._c is not None:
            return True
        try:
            self._reopen()
        except OSError as e:
            log.warning("Mirror target reopen failed image=%s error=%s", self._addr, e)
            return False
        self.losses += 1
        if self.on_loss is not None:
            self.on_loss()
        return True

    def _reopen(self):
        """Reopen the image if the client was shut out (blocklisted) or closed.

        librados reconnects to monitors and OSDs by itself, so a restarted or
        continued OSD needs nothing here.  Requests still pending on the old
        handle come back from wait() as ENOTCONN.  Raises OSError if the image
        cannot be opened (call again later).
        """
        if not self._dead and self._c is not None:
            return False
        log.info("Mirror target reopening image=%s pending=%d", self._addr, len(self._pending))
        self._failed += [(tag, errno.ENOTCONN) for tag in self._pending.values()]
        self._pending.clear()
        self._generation += 1
        self._done = queue.SimpleQueue()
        old, self._c = self._c, None
        if old is not None:
            # Closing waits for the old requests; do not hold the mirror thread.
            Thread(target=old.close, name="rbd-close", daemon=True).start()
        self._c = _Connection(self._addr, readonly=False)
        self._dead = False
        return True

    def close(self):
        """Close the image; requests still in flight are abandoned.

        librbd's close waits for them and talks to the OSDs itself; a hung
        OSD (timeout=0) may never answer.  After CLOSE_WAIT seconds the close
        goes on in the background, so that a cancelled job ends (as an NBD
        target's does).  librbd copied the requests' data.
        """
        with self._open_lock:
            self._closed = True
            c, self._c = self._c, None
        if c is not None:
            if self._pending:
                log.info("Mirror target closing image=%s with %d requests in flight",
                         self._addr, len(self._pending))
            c.close_within(CLOSE_WAIT)
        self._pending.clear()
        self._failed.clear()
