"""The copy-before-write scratch file: saved granules, and the record that they are saved.

A backup's point in time keeps the old bytes of every granule a client
changed while the backup still needed it (blockcopy/snapshot.py).  This file
holds those bytes *and* the record of which granules hold them, so that one
fdatasync() makes a save durable (an earlier format kept the record in a
second file, synced after the first: two syncs per save).

Layout of STATE_DIR/jobs/ID.cbw (sparse):

    [0, size)                    the saved granules' bytes, at their own offsets
    [T, T + 4096)                header: magic b"OVCBW2\\0\\0", the kernel's boot id
                                 (16 bytes) of the last boot that checked the
                                 entries, zeros; T = size rounded up to 4 KiB
    [T + 4096 + 8*i, +8)         entry of granule i: b"SV\\0\\0" and the crc32 of its
                                 bytes (little endian), or zeros: not saved

The rules that make a save count only once its bytes are there:
- A save writes the bytes, then the entries, then (unless the caller defers
  it, see below) fdatasync()s the file, before the client's change is issued.
- At reopen on the same boot (the header's boot id is this kernel's), the page
  cache survived the process: an entry is there only if the bytes written
  before it are, so every entry with the magic counts.
- At reopen after another boot (power loss), writes may have reached the disk
  in any order: an entry counts only if the crc32 of the bytes read back
  matches.  The entries that do not are zeroed, and then the header takes this
  boot's id (synced), so the same-boot rule holds again from here.

Deferred saves: when the disk's store can say that a change will not reach
stable storage before its next commit (an overlay cluster the map never
committed as data: disk/clustermap.py), the save is not synced at once;
sync_pending() runs as the store's commit hook, before that commit makes the
change durable.  A crash of the process keeps the page cache (same boot: the
entry counts); a power cut before the commit loses the change as well as the
save, and the view reads the disk, which still holds the old bytes.
"""

import errno
import os
import struct
import zlib

from ..core.fileio import pread_all, pwrite_all
from ..core.host import boot_id
from .bytemap import byteruns

MAGIC = b"OVCBW2\x00\x00"
ENTRY_MAGIC = b"SV\x00\x00"
_HEADER = struct.Struct("<8s16s")
_ENTRY = struct.Struct("<4sI")
HEADER_SIZE = 4096


class ScratchFile:
    def __init__(self, path, size, granularity, create, boot=None, adopt=None):
        """Open the scratch at path; create=True makes it anew, durably.

        adopt: [(first, end)] granules saved under the older two-file format
        (the scratch was the disk's size, the record ID.saved): the file is
        extended to this layout and those granules get their entries, synced.
        """
        self.path = path
        self.size = size
        self.granularity = granularity
        self.count = (size + granularity - 1) // granularity
        self._trailer = (size + 4095) // 4096 * 4096
        self._entries = self._trailer + HEADER_SIZE
        self._boot = boot_id() if boot is None else boot
        self.pending = False           # a deferred save is not synced yet
        self.repaired = 0              # entries a reopen after another boot dropped
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_TRUNC if create else 0)
        self._fd = os.open(path, flags, 0o600)
        try:
            if create or adopt is not None:
                os.ftruncate(self._fd, self._entries + 8 * self.count)
                self._write_header()
                self.bytes = bytearray(self.count)
                if adopt:
                    self._adopt(adopt)
                os.fdatasync(self._fd)
            else:
                self.bytes = self._load()
        except BaseException:
            os.close(self._fd)
            raise

    # -- saving -----------------------------------------------------------------

    def _span(self, first, end):
        off = first * self.granularity
        return off, min(end * self.granularity, self.size) - off

    def save(self, first, end, data):
        """Write the bytes of granules [first, end) (data: their bytes) and their
        entries; not synced (sync() or a deferred sync_pending() does that)."""
        off, n = self._span(first, end)
        if len(data) != n:
            raise ValueError("scratch save of %d bytes for %d" % (len(data), n))
        pwrite_all(self._fd, data, off)
        view = memoryview(data)
        g = self.granularity
        entries = bytearray(8 * (end - first))
        for i in range(end - first):
            _ENTRY.pack_into(entries, 8 * i, ENTRY_MAGIC, zlib.crc32(view[i * g:(i + 1) * g]))
        pwrite_all(self._fd, entries, self._entries + 8 * first)

    def sync(self):
        os.fdatasync(self._fd)

    def sync_pending(self):
        """Sync the deferred saves, if any (the store's commit hook)."""
        if self.pending:
            self.pending = False       # a save deferred during the sync sets it again
            try:
                os.fdatasync(self._fd)
            except BaseException:
                self.pending = True
                raise

    def readinto(self, view, offset):
        got = os.preadv(self._fd, [view], offset)
        if got != len(view):
            raise OSError(errno.EIO, "short read of the copy-before-write scratch at %d"
                          % offset)

    # -- reopening --------------------------------------------------------------

    def _write_header(self):
        header = bytearray(HEADER_SIZE)
        _HEADER.pack_into(header, 0, MAGIC, self._boot or bytes(16))
        pwrite_all(self._fd, header, self._trailer)

    def _load(self):
        st = os.fstat(self._fd)
        if st.st_size != self._entries + 8 * self.count:
            raise OSError(errno.EINVAL, "%s: %d bytes, expected %d (not a format 2 scratch)"
                          % (self.path, st.st_size, self._entries + 8 * self.count))
        header = bytearray(_HEADER.size)
        pread_all(self._fd, header, self._trailer)
        magic, boot = _HEADER.unpack(header)
        if magic != MAGIC:
            raise OSError(errno.EINVAL, "%s: bad scratch header magic %r" % (self.path, magic))
        same_boot = self._boot is not None and boot == self._boot
        saved = bytearray(self.count)
        bad = []
        for i, crc in self._entries_written():
            if same_boot or self._matches(i, crc):
                saved[i] = 1
            else:
                bad.append(i)
        if not same_boot:
            for i in bad:
                pwrite_all(self._fd, bytes(8), self._entries + 8 * i)
            self.repaired = len(bad)
            self._write_header()
            os.fdatasync(self._fd)
        return saved

    def _entries_written(self):
        """(granule, crc) of every entry with the magic (holes skipped)."""
        fd, start, stop = self._fd, self._entries, self._entries + 8 * self.count
        pos = start
        while pos < stop:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    return
                raise
            if pos >= stop:
                return
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), stop)
            pos -= (pos - start) % 8
            chunk = os.pread(fd, min(hole - pos, 1 << 20), pos)
            for k in range(0, len(chunk) - 7, 8):
                magic, crc = _ENTRY.unpack_from(chunk, k)
                if magic == ENTRY_MAGIC:
                    yield (pos - start + k) // 8, crc
            pos += max(8, len(chunk) - len(chunk) % 8)

    def _matches(self, i, crc):
        off, n = self._span(i, i + 1)
        buf = bytearray(n)
        try:
            self.readinto(memoryview(buf), off)
        except OSError:
            return False
        return zlib.crc32(buf) == crc

    def _adopt(self, runs):
        for first, end in runs:
            for i in range(first, end):
                off, n = self._span(i, i + 1)
                buf = bytearray(n)
                self.readinto(memoryview(buf), off)
                self.save(i, i + 1, buf)
                self.bytes[i] = 1

    def runs(self, value, first=0, end=None):
        """[(first, end)] of consecutive granules saved (value 1) or not (0)."""
        return byteruns(self.bytes, value, first, end)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
