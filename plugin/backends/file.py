"""A raw image file (or block device) as a backend."""

import errno
import fcntl
import logging
import os
import struct

from ..core.extent import Extent
from ..core.fileio import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                     copy_range, fallocate, pread_all, pwrite_all, write_zeroes)

log = logging.getLogger(__name__)

FS_IOC_GETVERSION = 0x80087601       # _IOR('v', 1, long): the inode's generation


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

    def stat(self):
        return os.fstat(self._fd)

    def generation(self):
        """The inode's generation (FS_IOC_GETVERSION), None where the file system has none."""
        try:
            raw = fcntl.ioctl(self._fd, FS_IOC_GETVERSION, bytes(8))
        except OSError:
            return None
        return struct.unpack("I", raw[:4])[0]

    def size(self):
        return self._size

    def readinto(self, buf, offset):
        pread_all(self._fd, buf, offset)

    def write(self, buf, offset, fua=False):
        pwrite_all(self._fd, buf, offset)
        if fua:
            os.fdatasync(self._fd)

    def copy_from(self, fd, offset, length):
        """Write what file fd holds at [offset, offset+length) to the same offsets."""
        copy_range(fd, self._fd, offset, length)

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
                result.append(Extent(pos, min(data, end) - pos, True))
                pos = min(data, end)
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            result.append(Extent(pos, min(hole, end) - pos, False))
            pos = min(hole, end)
        if offset + length > end:
            result.append(Extent(max(end, offset), offset + length - max(end, offset), True))
        return result

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


