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
were made, each one before the request that made it is answered.  A store
into a MAP_SHARED mapping is in the page cache at once, so it outlives the
process exactly as a pwrite would.

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

Cost: one 32-byte store into a shared mapping of the file (the page cache:
no system call, no sync) per change of a cluster's state (a first write into a cluster, zero, trim, a stream's copy); none for a
write into a cluster the overlay holds already.  A full journal or a failed
append is never an error: the map is committed instead (see ClusterMap.set).
"""

import logging
import mmap
import os
import struct
import zlib

from ..core.host import boot_id

log = logging.getLogger(__name__)

NAMES = ("clusters.journal.0", "clusters.journal.1")
JOURNAL_BYTES = 256 << 10
MAGIC = b"OVMAPJ1\0"
_HEADER = struct.Struct("<8sQ16s")           # magic, generation, boot id
_RECORD = struct.Struct("<QQQB3x")           # generation, first, end, state (+ crc32)
RECORD_BYTES = _RECORD.size + 4
assert _HEADER.size == RECORD_BYTES == 32
_STATES = (0, 1, 2)


def _record(generation, first, end, state):
    body = _RECORD.pack(generation, first, end, state)
    return body + struct.pack("<I", zlib.crc32(body))


class MapJournal:
    """The two journal files of one cluster map; every method but recover/start
    is called under the map's lock.

    Records are stored through a shared mapping of each file (MAP_SHARED): a
    store into the page cache with no system call, so the client thread keeps
    the GIL and queues behind nothing (a pwrite per record cost ~25 us per
    copy-on-write write inside nbdkit, GIL hand-offs included).  A file whose
    space could not be allocated is written with pwrite instead (a store into
    a hole of a full filesystem would be SIGBUS; a pwrite fails with ENOSPC and
    the change is committed instead)."""

    def __init__(self, paths, boot=None):
        self._boot = boot_id() if boot is None else boot
        self._fds = []
        self._maps = []
        try:
            for path in paths:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._fds.append(fd)
                self._maps.append(self._map(path, fd))
        except BaseException:
            self.close()
            raise
        self._capacity = max(0, (JOURNAL_BYTES - _HEADER.size) // RECORD_BYTES)
        self._active = 0
        self._generation = 0
        self._pos = _HEADER.size
        self._count = 0
        self._usable = False        # a header is in place: records can be appended
        self._unsettled = False     # rotated, and that commit has not completed
        self._replayed = []         # indexes of the files recover() read, oldest first

    @staticmethod
    def _map(path, fd):
        """A shared writable mapping of the whole file once its blocks exist, else None."""
        try:
            os.posix_fallocate(fd, 0, JOURNAL_BYTES)
        except OSError as e:
            log.warning("cannot allocate the map journal path=%s error=%s: records are "
                        "written with pwrite (committed at once where that fails)", path, e)
            return None
        try:
            return mmap.mmap(fd, JOURNAL_BYTES)
        except (OSError, ValueError) as e:
            log.warning("cannot map the map journal path=%s error=%s: records are written "
                        "with pwrite", path, e)
            return None

    def _store(self, index, data, pos):
        m = self._maps[index]
        if m is not None:
            m[pos:pos + len(data)] = data
        else:
            os.pwrite(self._fds[index], data, pos)

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
        found = []
        for index, fd in enumerate(self._fds):
            r = self._read(fd)
            if r is not None:
                found.append((r[0], index, r[1]))
        found.sort()
        self._generation = max([g for g, _, _ in found], default=0)
        self._replayed = [index for _, index, _ in found]
        return [change for _, _, changes in found for change in changes]

    def start(self):
        """clusters.map holds everything replayed: begin a new generation in file 0.

        The replayed files are invalidated oldest first: a crash in between leaves
        only newer records, which replay harmlessly over a map that holds them,
        never older ones alone (they would undo the newer changes)."""
        for index in self._replayed:
            self._store(index, b"\0" * _HEADER.size, 0)
        self._store(1, b"\0" * _HEADER.size, 0)          # nothing in file 1 counts
        self._active = 1
        self._switch()

    # -- running ---------------------------------------------------------

    def _switch(self):
        """New records go to the other file, under the next generation."""
        index = 1 - self._active
        generation = self._generation + 1
        try:
            self._store(index, _HEADER.pack(MAGIC, generation, self._boot or bytes(16)), 0)
        except OSError as e:
            log.warning("cannot start a map journal generation error=%s: records stay in "
                        "the current file (none yet: changes are committed at once)", e)
            return False
        self._active, self._generation = index, generation
        self._pos, self._count = _HEADER.size, 0
        self._usable = self._boot is not None
        return True

    def append(self, first, end, state):
        """Record a change; False when it is not recorded (the caller commits instead)."""
        if not self._usable or self._count >= self._capacity:
            return False
        try:
            self._store(self._active, _record(self._generation, first, end, state), self._pos)
        except OSError as e:
            log.warning("cannot append to the map journal error=%s: committing the map", e)
            return False
        self._pos += RECORD_BYTES
        self._count += 1
        return True

    def rotate(self):
        """A commit took its snapshot: switch files, unless the last commit failed
        (then the older file still holds changes clusters.map lacks)."""
        if self._unsettled:
            return
        if self._switch():
            self._unsettled = True

    def committed(self):
        """The commit that rotated completed: the older file is no longer needed."""
        self._unsettled = False

    def forget(self):
        """Invalidate every record: both headers are zeroed, so no replay brings a
        change back (the map is about to be replaced by one that holds none of
        them: ClusterMap.clear).  Appends are refused until restart().  Raises
        OSError if a header could not be zeroed (the map must then stay)."""
        for index in range(len(self._fds)):
            self._store(index, b"\0" * _HEADER.size, 0)
        self._usable = False
        self._unsettled = False

    def restart(self):
        """After forget(): new records go to file 0 under the next generation."""
        self._active = 1
        self._switch()

    def close(self):
        for m in self._maps:
            if m is not None:
                m.close()
        self._maps = []
        for fd in self._fds:
            os.close(fd)
        self._fds = []
