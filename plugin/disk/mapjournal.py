"""The cluster map's journal: map changes that outlive the server process between flushes.

Why it exists.  A write the server acknowledged has reached data.img's page
cache, and the page cache survives the server's crash (kill -9, an abort): a
raw file served by qemu-nbd keeps such a write.  A client that reconnects
(QEMU's reconnect-delay) resends only the requests that were not answered, and
its next flush succeeds on the new process; so the *map* change that makes an
acknowledged copy-on-write write visible must outlive the process too, or the
guest silently loses a write it was told is on disk.  clusters.map itself
changes only at a commit (a flush), which keeps its power-loss rule simple.

The journal is two files, STATE_DIR/clusters.journal.0 and .1, each
preallocated to JOURNAL_BYTES.  Each starts with a 32-byte header (magic,
generation, the kernel's boot id) and holds 32-byte records (generation,
first cluster, end cluster, state, crc32), appended in the order the changes
were made, each one before the request that made it is answered.

- Same boot: the page cache survived, so every record of an answered request
  is in the file.  Opening the overlay replays the records of both files in
  generation order over clusters.map, commits the result (data sync, map
  write, map sync) and starts a new generation.
- Another boot (power loss, reboot): records may name data that never
  reached the disk, so they are ignored; clusters.map as of the last flush is
  the disk, as NBD allows for writes that were not flushed.

Rotation: at each commit that has changes, under the map's lock and together
with its snapshot, new records go to the other file with the next generation.
The older file keeps the changes the commit is making durable until the next
rotation overwrites its header, and a rotation is skipped while the commit
before it has not completed, so replay always has every change since a point
that clusters.map already includes.  Replaying such a history is exact: each
record sets absolute states, so the last record naming a cluster decides it.

Cost: one 32-byte pwrite (page cache, no sync, outside the map's lock: only
the slot is taken under it) per change of a cluster's
state (a first write into a cluster, zero, trim, a stream's copy); none for a
write into a cluster the overlay holds already.  A full journal or a failed
append is never an error: the map is committed instead (see ClusterMap.set).
"""

import logging
import os
import struct
import threading
import zlib

log = logging.getLogger(__name__)

NAMES = ("clusters.journal.0", "clusters.journal.1")
JOURNAL_BYTES = 256 << 10
MAGIC = b"OVMAPJ1\0"
_HEADER = struct.Struct("<8sQ16s")           # magic, generation, boot id
_RECORD = struct.Struct("<QQQB3x")           # generation, first, end, state (+ crc32)
RECORD_BYTES = _RECORD.size + 4
assert _HEADER.size == RECORD_BYTES == 32
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_STATES = (0, 1, 2)


def boot_id():
    """The kernel's id of this boot (16 bytes); None where the kernel has none."""
    try:
        with open(_BOOT_ID) as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return None


def _record(generation, first, end, state):
    body = _RECORD.pack(generation, first, end, state)
    return body + struct.pack("<I", zlib.crc32(body))


class MapJournal:
    """The two journal files of one cluster map; every method but recover/start
    is called under the map's lock."""

    def __init__(self, paths, boot=None):
        self._boot = boot_id() if boot is None else boot
        self._fds = []
        try:
            for path in paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._fds.append(fd)
                if os.fstat(fd).st_size < JOURNAL_BYTES:
                    try:
                        os.posix_fallocate(fd, 0, JOURNAL_BYTES)
                    except OSError as e:
                        log.warning("cannot allocate the map journal path=%s error=%s: "
                                    "changes are committed at once when it is full", path, e)
        except BaseException:
            self.close()
            raise
        self._capacity = max(0, (JOURNAL_BYTES - _HEADER.size) // RECORD_BYTES)
        self._active = 0
        self._generation = 0
        self._pos = _HEADER.size
        self._count = 0
        self._usable = False        # a header is in place: records can be appended
        self._pending = [0, 0]      # reserved records not yet written, per file
        self._pending_lock = threading.Lock()
        self._unsettled = False     # rotated, and that commit has not completed

    # -- open ------------------------------------------------------------

    def _read(self, fd):
        """(generation, [(first, end, state)]) of one file, or None if not this boot's."""
        try:
            raw = os.pread(fd, JOURNAL_BYTES, 0)
        except OSError as e:
            log.warning("cannot read the map journal error=%s: ignored", e)
            return None
        if len(raw) < _HEADER.size:
            return None
        magic, generation, boot = _HEADER.unpack_from(raw, 0)
        if magic != MAGIC or self._boot is None or boot != self._boot or not generation:
            return None
        changes = []
        for pos in range(_HEADER.size, len(raw) - RECORD_BYTES + 1, RECORD_BYTES):
            body = raw[pos:pos + _RECORD.size]
            (crc,) = struct.unpack_from("<I", raw, pos + _RECORD.size)
            if zlib.crc32(body) != crc:
                break
            gen, first, end, state = _RECORD.unpack(body)
            if gen != generation:
                break                 # left over from an older generation: the end
            changes.append((first, end, state))
        return generation, changes

    def recover(self):
        """The changes to replay over clusters.map, oldest first (empty after another boot)."""
        found = [r for r in (self._read(fd) for fd in self._fds) if r is not None]
        found.sort()
        self._generation = max([g for g, _ in found], default=0)
        return [change for _, changes in found for change in changes]

    def start(self):
        """clusters.map holds everything replayed: begin a new generation in file 0."""
        self._write_header(1, b"\0" * _HEADER.size)      # nothing in file 1 counts
        self._active = 1
        self._switch()

    # -- running ---------------------------------------------------------

    def _write_header(self, index, header):
        os.pwrite(self._fds[index], header, 0)

    def _switch(self):
        """New records go to the other file, under the next generation."""
        index = 1 - self._active
        generation = self._generation + 1
        try:
            self._write_header(index, _HEADER.pack(MAGIC, generation, self._boot or bytes(16)))
        except OSError as e:
            log.warning("cannot start a map journal generation error=%s: records stay in "
                        "the current file (none yet: changes are committed at once)", e)
            return False
        self._active, self._generation = index, generation
        self._pos, self._count = _HEADER.size, 0
        self._usable = self._boot is not None
        return True

    def reserve(self):
        """A slot for one record (under the map's lock), or None when there is none
        (the caller commits instead).  write() fills it, outside the lock, so that
        client threads do not queue on the map's lock behind a system call; the
        store's range lock already orders two changes of one cluster."""
        if not self._usable or self._count >= self._capacity:
            return None
        slot = (self._active, self._pos, self._generation)
        self._pos += RECORD_BYTES
        self._count += 1
        with self._pending_lock:
            self._pending[self._active] += 1
        return slot

    def write(self, slot, first, end, state):
        """Fill a reserved slot; False if that failed (the caller commits instead)."""
        index, pos, generation = slot
        try:
            os.pwrite(self._fds[index], _record(generation, first, end, state), pos)
            return True
        except OSError as e:
            log.warning("cannot append to the map journal error=%s: committing the map", e)
            return False
        finally:
            with self._pending_lock:
                self._pending[index] -= 1

    def append(self, first, end, state):
        """reserve() and write() in one (tests, and callers that hold no lock)."""
        slot = self.reserve()
        return slot is not None and self.write(slot, first, end, state)

    def rotate(self):
        """A commit took its snapshot: switch files, unless the last commit failed
        (then the older file still holds changes clusters.map lacks), or a record
        reserved in the other file is still being written (a slow thread: its
        stale record must not land among the new generation's)."""
        if self._unsettled:
            return
        with self._pending_lock:
            if self._pending[1 - self._active]:
                return
        if self._switch():
            self._unsettled = True

    def committed(self):
        """The commit that rotated completed: the older file is no longer needed."""
        self._unsettled = False

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []
