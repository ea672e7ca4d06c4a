"""ByteMap: one byte per granule, in memory and in a file, for a job's durable sets.

Byte i of the file is granule i, so a torn page write leaves every entry old
or new (as the intent log).  A job only ever moves an entry one way between
two syncs (a backup's "needed" entries go 1 -> 0 once the target holds the
granule, "saved" entries 0 -> 1 once its bytes are in the scratch file), so
whatever a crash keeps of a write is either the old or the new state of each
granule, and the rules in snapshot.py say both are safe.
"""

import os

from ..core.fileio import fsync_dir, pwrite_all


class ByteMap:
    def __init__(self, path, count, fill=0, create=False):
        """Open the map at path (count entries); create=True writes it anew, every
        entry `fill`, durably (file, then its directory)."""
        self.path = path
        self.count = count
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                self.bytes = bytearray([fill]) * count
                pwrite_all(fd, self.bytes, 0)
                os.fdatasync(fd)
            except BaseException:
                os.close(fd)
                raise
            fsync_dir(os.path.dirname(path))
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                data = os.pread(fd, count + 1, 0)
                if len(data) != count or data.strip(b"\x00\x01"):
                    raise OSError(22, "%s: expected %d bytes of 0 or 1" % (path, count))
            except BaseException:
                os.close(fd)
                raise
            self.bytes = bytearray(data)
        self._fd = fd

    def set(self, spans, value):
        """Set the entries of every [first, end) in spans to value: in the file,
        synced, and only then in memory (what a reader of the memory sees is
        durable)."""
        spans = [(f, e) for f, e in spans if e > f]
        if not spans:
            return
        for first, end in spans:
            pwrite_all(self._fd, bytes([value]) * (end - first), first)
        self.sync()
        for first, end in spans:
            self.bytes[first:end] = bytes([value]) * (end - first)

    def mark(self, first, end, value):
        """Set entries [first, end) in the file (no sync: a crash of this process
        keeps it, a power cut may not) and in memory."""
        if end > first:
            piece = bytes([value]) * (end - first)
            pwrite_all(self._fd, piece, first)
            self.bytes[first:end] = piece

    def write_all(self):
        """Write the whole map from memory and sync it (a map filled in place)."""
        pwrite_all(self._fd, self.bytes, 0)
        self.sync()

    def sync(self):
        os.fdatasync(self._fd)

    def runs(self, value, first=0, end=None):
        """[(first, end)] of consecutive entries equal to value within [first, end)."""
        return byteruns(self.bytes, value, first, end)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self):
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def byteruns(data, value, first=0, end=None):
    """[(first, end)] of consecutive bytes of data (0 or 1) equal to value."""
    other = b"\x00" if value else b"\x01"
    want = b"\x01" if value else b"\x00"
    end = len(data) if end is None else min(end, len(data))
    out = []
    i = data.find(want, first, end)
    while i >= 0:
        j = data.find(other, i, end)
        if j < 0:
            j = end
        out.append((i, j))
        i = data.find(want, j, end)
    return out


