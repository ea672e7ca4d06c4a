"""The mirror's write-intent log: which regions of the disk may differ from the target.

As Linux md's write-intent bitmap, over coarse regions (1 MiB or more, at
most MAX_REGIONS of them), one byte per region, in memory and on disk
(STATE_DIR/jobs/<id>.intent; byte i is region i, so a torn page write
leaves each entry old or new).

The rule (docs/overlay.md, "Mirror durability"):

- SET before write: a region's byte is set in memory, written and
  fdatasync()ed BEFORE a client change into it is issued to the store.  A
  change into a region already set costs a few in-memory operations and no
  system call.  The log is a Disk guard (plugin/disk/disk.py): begin()
  registers the change (no I/O), persist() makes the record durable, end()
  runs after the change and its listeners.  The slow path sets the whole
  aligned group of SET_GROUP regions around the change (8 MiB with 1 MiB
  regions) in the same write and sync: setting more than was written is
  always safe (it only copies more after a crash), the group counts as
  touched (so it lives one checkpoint interval) and its unwritten regions
  are cleared by the checkpoint after, and a random writer pays one sync
  per group instead of one per region.
- CLEAR lazily: a region is cleared only when it is known in sync on the
  target and on the disk: no change into it is in progress, none began since
  the checkpoint started (nor in the interval before, to avoid clearing and
  setting a busy region every second), the mirror holds nothing of it (not
  dirty, not in flight, not waiting for a retry), the source was flushed
  after its last copy was read and a target flush that covers that copy has
  completed.  begin_checkpoint()/finish_checkpoints() do that.  Checkpoints
  may overlap (a new one begins while older flushes are in flight): "since
  the checkpoint started" is an epoch, not a flag.  Each change stamps its
  regions with the current epoch; a checkpoint takes the epoch c and starts
  c + 1, and it clears only regions whose last change began before c, i.e.
  before the previous checkpoint began.
- COPIED: a set region the mirror holds nothing of any more (its copies
  were answered by the target, no flush yet) is rewritten as 2 ("set,
  copied") in the file with no sync, every few MiB of copy.  It is still
  set for every rule above.  A mirror restarted after a crash compares such
  a region on the target with the disk instead of copying it (the target's
  answer is the truth: equal is in sync once a flush completes, anything
  else is copied), so the target-flush lag costs reads, not writes; when
  the target is the very instance that answered (the same file in the same
  boot, the same server process: instance() in backends/filetarget.py, nbdtarget.py), it needs no
  comparison at all, only a flush.  For that, COPIED is exact within a
  boot: a client change into a COPIED region rewrites it as 1 (in the
  file, no sync: the page cache keeps it across a kill -9, as it keeps the
  change) before the change is issued, and a region is marked only if no
  change into it is in progress or ended since the mirror looked at its
  holdings (mark_copied's `since`).  A power cut may leave a stale 2 (the
  rewrite lost, the change flushed): a new boot never trusts, it compares.
- The file is mapped (mmap, shared; pwrite where it cannot be, as the map
  journal does): a write into it is a store into the page cache, durable
  as a pwrite, with no system call, so a client rewriting a COPIED region
  keeps the GIL.  fdatasync() writes back what was stored.
- DEFERRED set (`defer`, a background mirror): when the store says the
  change cannot reach stable storage before its next commit (every cluster
  it touches is one the map never committed: a copy-on-write write into
  fresh space, store.defers_durability()), the slow path writes the set
  bytes without the fdatasync and the regions are OWED.  The sync then comes
  before anything could make the change matter after a power cut:
  sync_owed() runs as the store's commit hook (before the commit that makes
  the change durable) and before the mirror sends anything to the target
  (the copy pipeline's before_send, the write-through).  Until then a power
  cut loses the change with its set byte, and the region holds on the disk
  and on the target what it held when it was clear: in sync.  A change into
  an owed region that could be durable sooner (a committed cluster) syncs
  first.  A kill -9 keeps the page cache: the set bytes survive.
- A new log starts with every region set: until the first checkpoint the
  whole disk may differ.  So the log also serves as the bulk copy's record:
  a mirror killed half way copies again what it had not reached (plus what
  it copied after its last checkpoint), not everything.

Concurrency: client threads call begin/persist/end; the job thread calls the
checkpoint methods.  Set and clear agree through an ordering argument, not a
lock on the fast path: a change registers itself (begin) before it tests the
bit (persist); the clearer clears the bit before it looks for registered
changes, and sets it back if it finds one.  Either the clearer sees the
change, or the change sees the cleared bit and takes the slow path (set,
write, fdatasync under the file lock).
"""

import itertools
import logging
import mmap
import os
import threading
from array import array

from ..core.fileio import pwrite_all

log = logging.getLogger(__name__)

MiB = 1 << 20
MIN_REGION = 1 * MiB
MAX_REGIONS = 65536
# A first write into a clear region sets the aligned group of this many regions
# around it with one fdatasync (see "SET before write" above).
SET_GROUP = 8

_SET = b"\x01"
_CLEAR = b"\x00"
_COPIED = b"\x02"
SET, COPIED = 1, 2                    # the states of a set region (0: clear)
# Reading a log: 0, 1 and 2 are kept, any other byte counts as set.
_LOAD = bytes([0, 1, 2] + [1] * 253)
# Any set state as 1, for find() over the set regions.
_IS_SET = bytes([0] + [1] * 255)


def region_size_for(size, granularity):
    """The region size for a disk of `size` bytes: a power of two >= 1 MiB and
    >= granularity, with at most MAX_REGIONS regions."""
    region = max(MIN_REGION, granularity)
    while (size + region - 1) // region > MAX_REGIONS:
        region *= 2
    return region


class Checkpoint:
    """What begin_checkpoint() found: its epoch and the regions it may clear."""

    __slots__ = ("epoch", "candidates")

    def __init__(self, epoch, candidates):
        self.epoch, self.candidates = epoch, candidates

    def __len__(self):
        return len(self.candidates)


class IntentLog:
    """The on-disk write-intent bitmap of one mirror job."""

    def __init__(self, path, size, region_size, create=False):
        if region_size < 512 or region_size & (region_size - 1):
            raise ValueError("region size must be a power of 2")
        self.path = path
        self.size = size
        self.region_size = region_size
        self._shift = region_size.bit_length() - 1
        self.nregions = n = max(1, (size + region_size - 1) // region_size)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()        # file writes, the slow path, checkpoints
        # Syncs (sync_owed, checkpoints) take this one, not _lock: a client rewriting a
        # COPIED region or making a deferred set never waits for the disk.  _sync_lock first.
        self._sync_lock = threading.Lock()
        self._owed_gen = 0                   # deferred sets made (which ones a sync covered)
        data = _SET * n if create else os.pread(self._fd, n, 0)
        if len(data) != n:
            # Never written completely: every region may differ.
            log.warning("intent log %s has %d bytes, not %d: every region counts as dirty",
                        path, len(data), n)
            data = _SET * n
        self._bits = bytearray(data.translate(_LOAD))
        if create or os.fstat(self._fd).st_size != n:
            # Durably what memory says before it is mapped (not zeros: clear regions).
            os.ftruncate(self._fd, 0)
            pwrite_all(self._fd, self._bits, 0)
            os.fdatasync(self._fd)
        try:
            os.posix_fallocate(self._fd, 0, n)      # its blocks exist: a store needs no space
            self._file = mmap.mmap(self._fd, n)     # the file's bytes (see the docstring)
        except (OSError, ValueError) as e:
            log.warning("cannot allocate or map intent log %s (%s): written with pwrite", path, e)
            self._file = None
        # The epoch in which the last change into each region began (0: none);
        # begin_checkpoint() starts a new epoch.
        self._touched = array("Q", bytes(8 * n))
        self._epoch = 1
        self._writing = {}                    # token -> (first, end, offset, length) in progress
        self._tokens = itertools.count()
        # A stamp from _seq per region, taken as the last change into it ended
        # (mark_copied's `since`: changes that ended after the mirror looked).
        self._seq = itertools.count(1)
        self._ended = array("Q", bytes(8 * n))
        self.sets = 0                         # slow paths taken (for tests, the log)
        # fn(offset, length): True if a change there cannot be durable before the
        # store's next commit (DEFERRED set, above); None: every set is synced.
        self.defer = None
        self._owed = bytearray(n)             # 1: set in the page cache, not synced
        self.owed = False                     # any region owed
        self.deferred_sets = 0

    # -- the guard (client threads) -------------------------------------

    def _span(self, offset, length):
        first = offset >> self._shift
        end = min(((offset + max(length, 1) - 1) >> self._shift) + 1, self.nregions)
        return first, end

    def begin(self, offset, length):
        first, end = self._span(offset, length)
        token = next(self._tokens)
        self._writing[token] = (first, end, offset, length)
        if end - first == 1:
            self._touched[first] = self._epoch
        else:
            self._touched[first:end] = array("Q", (self._epoch,)) * (end - first)
        return token

    def persist(self, token):
        """Make sure the regions of the change are set on disk before it is issued."""
        first, end, offset, length = self._writing[token]
        bits = self._bits
        if end - first == 1:
            state = bits[first]
            if state == SET:
                if self.owed and self._owed[first]:
                    self._sync_unless_deferred(offset, length)
                return
            if state == COPIED:
                self._uncopy(first, end)
                return
        elif bits.find(_CLEAR, first, end) < 0:
            if bits.find(_COPIED, first, end) >= 0:
                self._uncopy(first, end)
            if self.owed and self._owed.find(1, first, end) >= 0:
                self._sync_unless_deferred(offset, length)
            return
        # The slow path below rewrites COPIED regions of the group as SET too.
        # Set the whole group around the change (SET_GROUP regions, aligned):
        # one fdatasync then covers the next first writes nearby too.
        first -= first % SET_GROUP
        end = min(end + (-end % SET_GROUP), self.nregions)
        defer = self.defer
        deferred = defer is not None and defer(offset, length)
        with self._lock:
            if self._fd is None:
                return            # the job is gone (a change that began as it ended)
            bits[first:end] = _SET * (end - first)
            self._store(first, end)
            if deferred:
                self._owed[first:end] = b"\x01" * (end - first)
                self.owed = True
                self._owed_gen += 1
                self.deferred_sets += 1
            else:
                os.fdatasync(self._fd)
                self._synced()
                self.sets += 1
        # The group counts as touched: it lives at least one checkpoint interval.
        self._touched[first:end] = array("Q", (self._epoch,)) * (end - first)

    def _sync_unless_deferred(self, offset, length):
        """A change into owed regions: sync them first unless it too cannot be
        durable before the store's next commit."""
        defer = self.defer
        if defer is None or not defer(offset, length):
            self.sync_owed()

    def sync_owed(self):
        """Make the owed sets durable (the store's commit hook; before the mirror
        sends anything to the target).  Cheap when nothing is owed."""
        if not self.owed:
            return
        with self._sync_lock:
            with self._lock:
                if not self.owed or self._fd is None:
                    return
                gen = self._owed_gen
            self._sync_since(gen)

    def _sync_since(self, gen):
        """(under _sync_lock, not _lock) fdatasync: every write made before it
        began is durable after it; the owed sets are settled only if no deferred
        set came meanwhile (it may have missed this sync: it stays owed)."""
        os.fdatasync(self._fd)
        with self._lock:
            if self._owed_gen == gen:
                self._synced()

    def _synced(self):
        """(under _lock) The file was synced: nothing is owed."""
        if self.owed:
            self._owed[:] = bytes(self.nregions)
            self.owed = False

    def _uncopy(self, first, end):
        """A change is coming into COPIED regions: rewrite them as SET first (no sync)."""
        with self._lock:
            if self._fd is None:
                return
            bits = self._bits
            if bits.find(_COPIED, first, end) < 0:
                return                 # the mark was taken back meanwhile
            bits[first:end] = bits[first:end].replace(_COPIED, _SET)
            self._store(first, end)

    def _store(self, first, end):
        """(under _lock) Regions [first, end) into the file: a store into its mapping."""
        if self._file is not None:
            self._file[first:end] = self._bits[first:end]
        else:
            pwrite_all(self._fd, self._bits[first:end], first)

    def end(self, token):
        span = self._writing.get(token)
        if span is None:
            return
        # Stamp before leaving _writing: mark_copied sees one or the other.
        first, end = span[0], span[1]
        stamp = next(self._seq)
        if end - first == 1:
            self._ended[first] = stamp
        else:
            self._ended[first:end] = array("Q", (stamp,)) * (end - first)
        self._writing.pop(token, None)

    def change_mark(self):
        """A stamp for mark_copied(since=): take it before looking at the mirror's
        holdings; changes that end after it are not marked COPIED."""
        return next(self._seq)

    # -- queries -----------------------------------------------------------

    def regions(self):
        """(offset, length) of every run of set regions (what a resumed mirror copies)."""
        for start, length, _ in self.runs(copied_apart=False):
            yield start, length

    def runs(self, copied_apart=True):
        """(offset, length, copied) of every run of set regions; with copied_apart,
        runs of COPIED regions come apart from the others (copied=True)."""
        bits, shift, n = self._bits, self._shift, self.nregions
        marks = bits if copied_apart else bits.translate(_IS_SET)
        i = 0
        while i < n:
            state = marks[i]
            j = i + 1
            while j < n and marks[j] == state:
                j += 1
            if state:
                start = i << shift
                yield start, min(j << shift, self.size) - start, state == COPIED
            i = j

    def set_bytes(self):
        return min((self.nregions - self._bits.count(_CLEAR)) << self._shift, self.size)

    def copied_bytes(self):
        return min(self._bits.count(COPIED) << self._shift, self.size)

    def mark_copied(self, busy, first=0, end=None, since=None):
        """The mirror holds nothing of the set regions in [first, end) that busy does
        not name: mark them COPIED (one write into the file, no sync; see the module
        docstring).

        since: a change_mark() taken before busy was computed.  A region a change
        is in progress in, or one ended in since then (busy may not show it), is
        not marked: (a) mark, then (b) look for such changes and take the mark
        back; a change that comes after (a) finds COPIED and rewrites it itself.
        Returns the number of regions marked."""
        bits, ended = self._bits, self._ended
        end = self.nregions if end is None else min(end, self.nregions)
        marked = []
        with self._lock:
            if self._fd is None:
                return 0
            i = bits.find(_SET, first, end)
            while i >= 0:
                if not busy[i] and (since is None or ended[i] < since):
                    bits[i] = COPIED                             # (a)
                    marked.append(i)
                i = bits.find(_SET, i + 1, end)
            if not marked:
                return 0
            for lo, hi, _, _ in list(self._writing.values()):    # (b)
                for r in range(max(lo, first), min(hi, end)):
                    if bits[r] == COPIED:
                        bits[r] = SET
            if since is not None:
                for r in marked:
                    if ended[r] >= since:
                        bits[r] = SET
            self._store(0, self.nregions)
        return sum(1 for r in marked if bits[r] == COPIED)

    # -- checkpoints (the job thread) ---------------------------------------

    def region_of(self, offset):
        return offset >> self._shift

    def begin_checkpoint(self, busy):
        """Regions that may be cleared once the coming source and target flushes
        complete: set, not busy (a bytearray, 1 = the mirror holds some of it),
        and untouched by clients since the previous checkpoint began.  Starts a
        new epoch: the changes that begin from now on do not count as before it."""
        epoch = self._epoch
        self._epoch = epoch + 1
        marks, touched = self._bits.translate(_IS_SET), self._touched
        candidates = []
        i = marks.find(_SET)
        while i >= 0:
            if touched[i] < epoch and not busy[i]:
                candidates.append(i)
            i = marks.find(_SET, i + 1)
        return Checkpoint(epoch, candidates)

    def finish_checkpoint(self, checkpoint, busy):
        return self.finish_checkpoints([checkpoint], busy)

    def finish_checkpoints(self, checkpoints, busy):
        """The flushes of these checkpoints completed: clear their candidates still
        untouched since the checkpoint's epoch and idle, with one write and sync.

        busy: the mirror's holdings now.  Returns the number of regions cleared.
        """
        if not any(checkpoints):
            return 0
        with self._sync_lock:
            with self._lock:
                if self._fd is None:
                    return 0
                bits, touched = self._bits, self._touched
                cleared = []
                for checkpoint in checkpoints:
                    epoch = checkpoint.epoch
                    for r in checkpoint.candidates:
                        if bits[r] and touched[r] < epoch and not busy[r]:
                            bits[r] = 0                  # (a) clear, then (b) look
                            cleared.append(r)
                if not cleared:
                    return 0
                writing = list(self._writing.values())
                restored = 0
                if writing:
                    for r in cleared:
                        if any(span[0] <= r < span[1] for span in writing):
                            bits[r] = 1
                            restored += 1
                self._store(0, self.nregions)
                gen = self._owed_gen
            # A client change finding a region cleared sets it again after this
            # write (under _lock), and syncs it itself unless deferred.
            self._sync_since(gen)
        return len(cleared) - restored

    def remove(self):
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self):
        with self._sync_lock, self._lock:
            if self._fd is not None:
                if self._file is not None:
                    self._file.close()
                os.close(self._fd)
                self._fd = None
