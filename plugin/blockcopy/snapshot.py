"""A point in time of the served disk, kept while clients write (copy-before-write).

A backup copies the disk as it was when the job started.  From that moment
on, the snapshot is a Disk guard (plugin/disk/disk.py): before a client
change (write, zero, trim) reaches the store, the old bytes of every granule
the backup still *needs* are saved in a scratch file of the state directory
(copy-before-write, CBW), durably, and only then is the change issued.  The
snapshot's :meth:`read` and :meth:`extents` give the point-in-time view:
saved granules from the scratch file, every other one from the disk (which
has not changed there since the start, or the granule is not needed).  The
backup job copies from this view to its target (push), or the view is
served as a read-only NBD export (pull).

Files, in STATE_DIR/jobs/ (ByteMap: one byte per granule):

    ID.needed   1: the backup still needs the granule's point-in-time bytes
                (the target does not durably hold them yet)
    ID.cbw      the saved granules' bytes at their own offsets, and an entry
                per saved granule with their crc32 (blockcopy/scratch.py)
    ID.answered 1: the target answered a copy of the granule (no flush yet); written
                without a sync, it only matters to a restart that finds the very
                target instance that answered (blockcopy/link.py TargetTrust)

The rules that make the view survive kill -9 and power loss:
- SAVE before change: the scratch bytes and their entries are written and
  fdatasync()ed (one sync) before the change is issued.  A crash in between
  leaves the granule unsaved (its entry missing, or its crc wrong after a
  power cut) and unchanged: the disk still holds it.  Where the change cannot
  reach stable storage before the store's next commit (an overlay cluster
  never committed as data), the sync is left to that commit (scratch.py).
- CLEAR after flush: a needed entry is cleared (in the file, synced, then in
  memory) only after a target flush covering its copy succeeded.  Until then
  a change into it is saved first, so after a crash the view still has it.
- A change into a granule that is not needed is never held up: that granule
  is on the target for good, or not part of the backup.

Concurrency: the job's copies and the export's reads hold the granules in a
range lock (the copy pipeline's) while they read the view; a CBW holds them
from begin() to end(), i.e. until the client's change completed, so no read
sees a granule half way between its old and new bytes.  The fast path (no
needed granule in the change) takes no lock.
"""

import logging
import os

from ..core.extent import Extent, append_merged
from .bytemap import ByteMap
from .scratch import ScratchFile

log = logging.getLogger(__name__)

NEEDED, SAVED, SCRATCH, ANSWERED = ".needed", ".saved", ".cbw", ".answered"


class SnapshotBroken(Exception):
    """on-cbw-error=break-snapshot: a save failed; the view is no longer exact."""


class PointInTime:
    def __init__(self, store, size, granularity, ranges, base_path, needed_runs=None,
                 break_guest_write=True):
        """base_path: STATE_DIR/jobs/ID (files get the suffixes above).

        needed_runs: [(offset, length)] the backup needs (a new snapshot: the
        caller computes them with clients quiesced); None: reopen the files a
        crash or stop left.  ranges: the RangeLock the copies hold.
        """
        self.store = store
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._ranges = ranges
        self.base_path = base_path
        self.break_guest_write = break_guest_write
        self.broken = None                # OSError that broke it (break-snapshot)
        self.on_saved = None              # (offset, length) newly saved (sync=none)
        self.on_broken = None             # () after a break-snapshot failure
        self.saves = 0                    # CBW operations, for the log
        count = (size + granularity - 1) >> self._shift
        if needed_runs is None:
            self.needed = ByteMap(base_path + NEEDED, count)
            self.saved = self._reopen_scratch(count)
            exists = os.path.exists(base_path + ANSWERED)
            self.answered = ByteMap(base_path + ANSWERED, count, 0, create=not exists)
        else:
            self.answered = ByteMap(base_path + ANSWERED, count, 0, create=True)
            self.saved = ScratchFile(base_path + SCRATCH, size, granularity, create=True)
            self.needed = ByteMap(base_path + NEEDED, count, 0, create=True)
            data = self.needed.bytes
            for off, n in needed_runs:
                first, end = self._span(off, n)
                data[first:end] = b"\x01" * (end - first)
            self.needed.write_all()
        # A deferred save is synced before the commit that could make its change durable.
        self._hooked = hasattr(store, "add_commit_hook")
        if self._hooked:
            store.add_commit_hook(self.saved.sync_pending)

    def _reopen_scratch(self, count):
        """The scratch a crash or stop left; one of the older format (a separate
        ID.saved record) is converted, durably, and its record removed."""
        path = self.base_path + SCRATCH
        if not os.path.exists(self.base_path + SAVED):
            scratch = ScratchFile(path, self.size, self.granularity, create=False)
            if scratch.repaired:
                log.warning("Copy-before-write scratch checked after a reboot path=%s: %d "
                            "saves had not reached the disk (their granules read from the "
                            "disk, which the changes had not reached either)", path,
                            scratch.repaired)
            return scratch
        old = ByteMap(self.base_path + SAVED, count)
        try:
            runs = old.runs(1)
        finally:
            old.close()
        scratch = ScratchFile(path, self.size, self.granularity, create=False, adopt=runs)
        os.unlink(self.base_path + SAVED)
        log.info("Copy-before-write scratch converted to format 2 path=%s saved=%d granules",
                 path, sum(e - f for f, e in runs))
        return scratch

    def _span(self, offset, length):
        g = self.granularity
        return offset >> self._shift, min((offset + length + g - 1) >> self._shift,
                                          self.needed.count)

    def _range(self, first, end):
        off = first << self._shift
        return off, min(end << self._shift, self.size) - off

    def needed_runs(self):
        """[(offset, length)] still needed (for the job's copy set)."""
        return [self._range(f, e) for f, e in self.needed.runs(1)]

    def needed_bytes(self):
        return sum(n for _, n in self.needed_runs())

    def is_needed(self, offset, length):
        first, end = self._span(offset, length)
        return self.needed.bytes.find(b"\x01", first, end) >= 0

    def needed_within(self, offset, length):
        """The needed sub-ranges of [offset, offset+length)."""
        first, end = self._span(offset, length)
        return [self._range(f, e) for f, e in self.needed.runs(1, first, end)]

    # -- the guard (client threads) --------------------------------------------

    def begin(self, offset, length):
        if self.broken is not None or length <= 0:
            return None
        first, end = self._span(offset, length)
        if self.needed.bytes.find(b"\x01", first, end) < 0:
            return None
        return (first, end, self._ranges.acquire(first, end), offset, length)

    def persist(self, token):
        """Save the point-in-time bytes of the needed, unsaved granules of the change."""
        if token is None or self.broken is not None:
            return
        first, end, _, offset, length = token
        todo = [(f, e) for f, e in self.needed.runs(1, first, end)
                if self.saved.bytes.find(b"\x00", f, e) >= 0]
        if not todo:
            return
        try:
            self._save(first, end, offset, length)
        except OSError as e:
            if self.break_guest_write:
                log.warning("Copy-before-write failed offset=%d length=%d error=%s: the "
                            "client's change fails", first << self._shift,
                            (end - first) << self._shift, e)
                raise
            self.broken = e
            log.warning("Copy-before-write failed offset=%d error=%s: the snapshot breaks, "
                        "the client's change goes on", first << self._shift, e)
            if self.on_broken is not None:
                self.on_broken()

    def _save(self, first, end, offset, length):
        """The old bytes of the needed, unsaved granules of [first, end), before
        the change of [offset, offset+length) is issued: durable now, or (the
        store says the change cannot be durable before its next commit) synced
        by that commit's hook."""
        defers = getattr(self.store, "defers_durability", None)
        deferred = defers is not None and defers(offset, length)
        runs = []
        for f, e in self.needed.runs(1, first, end):
            for sf, se in self.saved.runs(0, f, e):
                off, n = self._range(sf, se)
                buf = bytearray(n)
                self.store.read(buf, off)
                self.saved.save(sf, se, buf)
                runs.append((sf, se))
        if deferred:
            self.saved.pending = True
        else:
            self.saved.sync()
        for sf, se in runs:
            self.saved.bytes[sf:se] = b"\x01" * (se - sf)
        self.saves += 1
        if self.on_saved is not None:
            for sf, se in runs:
                self.on_saved(*self._range(sf, se))

    def end(self, token):
        if token is not None:
            self._ranges.release(token[2])

    # -- the view ---------------------------------------------------------------

    def read(self, buf, offset):
        """Fill buf with the point-in-time bytes at offset (the caller holds the
        granules in the range lock, or uses read_locked)."""
        view = memoryview(buf)
        length = len(view)
        first, end = self._span(offset, length)
        pos = offset
        for sf, se in self.saved.runs(1, first, end):
            soff = max(offset, sf << self._shift)
            if soff > pos:
                self.store.read(view[pos - offset:soff - offset], pos)
            send = min(offset + length, se << self._shift)
            self.saved.readinto(view[soff - offset:send - offset], soff)
            pos = send
        if pos < offset + length:
            self.store.read(view[pos - offset:], pos)

    def read_locked(self, buf, offset):
        """read(), holding the granules against a concurrent save (the export)."""
        first, end = self._span(offset, len(buf))
        with self._ranges.hold(first, end):
            self.read(buf, offset)

    def extents(self, offset, length):
        """What the view reads as: saved granules are data, the rest as the disk."""
        first, end = self._span(offset, length)
        out = []
        pos, stop = offset, offset + length
        for sf, se in self.saved.runs(1, first, end):
            soff = max(offset, sf << self._shift)
            if soff > pos:
                for e in self.store.extents(pos, soff - pos):
                    append_merged(out, e.offset, e.length, e.zero)
            send = min(stop, se << self._shift)
            append_merged(out, soff, send - soff, False)
            pos = send
        if pos < stop:
            for e in self.store.extents(pos, stop - pos):
                append_merged(out, e.offset, e.length, e.zero)
        return [Extent(e.offset, e.length, e.zero) for e in out]

    # -- the job ------------------------------------------------------------------

    def copied(self, ranges):
        """The target durably holds these ranges (a flush covering their copies
        succeeded): they are no longer needed.  File first, then memory."""
        # Copies are granule aligned (the last granule ends at the disk's end).
        self.needed.set([self._span(off, n) for off, n in ranges], 0)

    def note_answered(self, offset, length):
        """The target answered a copy of these granules (no flush covers it yet)."""
        first, end = self._span(offset, length)
        self.answered.mark(first, end, 1)

    def answered_needed_runs(self):
        """[(offset, length)] needed, whose copy the target had answered."""
        out = []
        for f, e in self.needed.runs(1):
            out += [self._range(af, ae) for af, ae in self.answered.runs(1, f, e)]
        return out

    def forget_answered(self):
        """Another target instance: its answers vouch for nothing (durably)."""
        self.answered.bytes[:] = bytes(len(self.answered.bytes))
        self.answered.write_all()

    def close(self):
        if self._hooked:
            self.store.remove_commit_hook(self.saved.sync_pending)
            self._hooked = False
        self.answered.close()
        self.needed.close()
        self.saved.close()

    def remove(self):
        """The job ended: free the scratch space and the maps."""
        self.close()
        for suffix in (NEEDED, SAVED, SCRATCH, ANSWERED):
            try:
                os.unlink(self.base_path + suffix)
            except FileNotFoundError:
                pass
