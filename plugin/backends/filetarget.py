"""A raw file or block device as an asynchronous copy target (the mirror's), and
its reader.

The job thread submits writes, zeroes and flushes tagged with what they
cover, then collects completions with wait(), so that a slow disk never
blocks the thread (cancel stays prompt): a small thread pool of pwrite()s
(they release the GIL).  A failed request comes back from wait() with its
errno; the caller decides what it means (the job's error policy).  The
interface every target shares is in backends/__init__.py.
"""

import concurrent.futures
import errno
import os
import stat

from ..core.errors import errno_of
from ..core.host import boot_id
from .file import FileBackend

MAX_ZERO = 1 << 30        # as the NBD target's: one request covers at most this much


class FileTarget:
    """A raw file or block device, written by a few threads."""

    # fdatasync covers writes made through any descriptor of the file.
    multi_conn = True
    losses = 0              # files never lose their connection

    def __init__(self, path, workers=4):
        self.address = path
        self.on_loss = None
        self._backend = FileBackend(path, readonly=False)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="mirror-io")
        self._pending = {}

    def size(self):
        return self._backend.size()

    def instance(self):
        """What holds the writes this target answered: the regular file (device,
        inode and the inode's generation, which a file made anew in a freed
        inode does not share) in this boot, whose page cache a crash of this
        process keeps.  None where that cannot be told: no boot id, a block
        device (a volume made anew gets the same number), a file system
        without inode generations (see blockcopy/link.py TargetTrust)."""
        boot = boot_id()
        st = self._backend.stat()
        generation = self._backend.generation() if stat.S_ISREG(st.st_mode) else None
        if boot is None or generation is None:
            return None
        return {"kind": "file", "boot": boot.hex(), "dev": st.st_dev, "ino": st.st_ino,
                "generation": generation}

    def extents(self, offset, length):
        return self._backend.extents(offset, length)

    def open_reader(self):
        """A Reader (a restored mirror compares what it had copied)."""
        return FileReader(self.address)

    def in_flight(self):
        return len(self._pending)

    def submit_write(self, buf, offset, tag):
        fut = self._pool.submit(self._backend.write, buf, offset)
        self._pending[fut] = tag

    def submit_copy(self, fd, offset, length, tag):
        """Write what file fd holds at [offset, offset+length) to the same offsets,
        in the kernel (the copy pipeline's file-to-file path)."""
        fut = self._pool.submit(self._backend.copy_from, fd, offset, length)
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

    def wait_open(self, timeout):
        """A file is open once made."""
        return True

    def reconnect(self, timeout=0.0):
        """Files do not disconnect: always connected."""
        return True

    def detach(self):
        """Nothing to hand over: the pivot opens the file itself."""
        return None

    def close(self):
        self._pool.shutdown(wait=True)
        self._backend.close()


class FileReader:
    """read(length, offset) -> bytes from a file of its own descriptor."""

    def __init__(self, path):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, length, offset):
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, "short read at offset %d" % offset)
        return data

    def interrupt(self):
        """A file read does not hang on a peer: nothing to do."""

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
