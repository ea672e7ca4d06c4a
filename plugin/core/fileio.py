"""Low-level file I/O the standard library lacks: whole-buffer pread/pwrite, fallocate."""

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10



def _load_libc():
    """glibc by its soname; ctypes.util only where that fails (it imports shutil,
    subprocess and tempfile and runs ldconfig: ~15 ms of every nbdkit start)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library
        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd, mode, offset, length):
    """fallocate(2), which Python's os module lacks; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def pread_all(fd, buf, offset):
    """Fill the writable buffer buf from fd at offset; raise EIO on a short file."""
    n = os.preadv(fd, [buf], offset)
    if n == len(buf):             # the usual case: one call, no memoryview
        return
    view = memoryview(buf)[n:]
    offset += n
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, "short read at offset %d" % offset)
        view = view[n:]
        offset += n


def pwrite_all(fd, buf, offset):
    n = os.pwrite(fd, buf, offset)
    if n == len(buf):             # the usual case: one call, no memoryview
        return
    view = memoryview(buf)[n:]
    offset += n
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# copy_file_range errors that mean "not between these two files": copy by hand.
_NO_COPY_RANGE = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
COPY_CHUNK = 1 << 20


def copy_range(src_fd, dst_fd, offset, length):
    """Copy [offset, offset+length) of src_fd to the same offsets of dst_fd in the
    kernel (copy_file_range: no bytes pass through Python; a file system that
    shares extents may share them), or by pread/pwrite where the kernel will not.
    A source that ends early is EIO."""
    pos, stop = offset, offset + length
    while pos < stop:
        try:
            n = os.copy_file_range(src_fd, dst_fd, stop - pos, pos, pos)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            break
        if n == 0:
            raise OSError(errno.EIO, "copy source ended at offset %d" % pos)
        pos += n
    buf = None
    while pos < stop:
        if buf is None:
            buf = bytearray(min(COPY_CHUNK, stop - pos))
        view = memoryview(buf)[:min(len(buf), stop - pos)]
        pread_all(src_fd, view, pos)
        pwrite_all(dst_fd, view, pos)
        pos += len(view)


def write_zeroes(fd, offset, length):
    """Write zero bytes over a range (when no fallocate mode is supported)."""
    chunk = bytes(min(length, 1 << 20))
    while length:
        n = min(length, len(chunk))
        pwrite_all(fd, memoryview(chunk)[:n], offset)
        offset += n
        length -= n




def fsync_dir(path):
    """Make a rename or unlink in directory path durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_if_there(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
