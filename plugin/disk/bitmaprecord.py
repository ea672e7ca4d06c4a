"""The durable record of persistent dirty bitmaps: what makes them survive a crash.

Two kinds of files in STATE_DIR/bitmaps/ (layout: bitmapfile.py, docs/bitmaps.md):

- RegionRecord (`regions`), shared by every persistent bitmap: Linux md's
  write-intent rule over coarse regions (1 MiB or more).  SET before write: a
  region's byte is written and fdatasync()ed before the first client change
  into a clear region is issued to the store; a change into a set region pays
  no system call.  The slow path sets the aligned group of SET_GROUP regions
  around the change with one sync, together with every group other writers
  queued meanwhile (group commit).  CLEAR lazily: a checkpoint clears a set
  region only once every recording bitmap's saved copy holds every change
  into it (see checkpoint_candidates/clear).
- BitmapFile (`NNNNNNNN.bitmap`), one per bitmap: two preallocated copies of
  its bits; a save writes the older copy with the next generation and syncs
  it, so a crash at any point leaves the previous copy intact.  No save needs
  new space, so saves (and the flushes that trigger them) work on a full
  filesystem; only making a new file (an add) can fail with ENOSPC.

After a crash a recording bitmap is its saved copy united with the set
regions; a disabled bitmap is its saved copy.

Which regions a checkpoint may clear is decided exactly, with no lock on the
client path: a client change marks the bitmaps in memory BEFORE it tests its
regions' bytes (and stamps them with the epoch, which only decides which
regions count as idle).  A checkpoint snapshots the recording bitmaps, saves
the changed ones, then (a) clears the idle candidates in memory and (b)
compares the bitmaps with the snapshots: a region where any bitmap gained a
bit since its snapshot is set back, and only then is the record written.  A
change whose test came before (a) marked before (a), so (b) sees it; a change
whose test came after (a) finds the byte clear and takes the slow path.  A
mark that sets no new bit is already in the saved copy.
"""

import errno
import logging
import os
import threading
from array import array

from ..core.fileio import fsync_dir, pwrite_all, unlink_if_there
from . import bitmapfile
from .bitmapfile import COPY_HEADER_BYTES, HEADER_BYTES, REGIONS, TMP

log = logging.getLogger(__name__)

SET_GROUP = 16          # a first write into a clear region sets this many with one sync
_SET, _CLEAR = b"\x01", b"\x00"


def make_folder(folder):
    """STATE_DIR/bitmaps, made durably on first use; True if it was made now."""
    if os.path.isdir(folder):
        return False
    os.mkdir(folder, 0o700)
    try:
        fsync_dir(os.path.dirname(folder))
    except OSError:
        remove_folder(folder)
        raise
    return True


def remove_folder(folder):
    """Take back a folder make_folder() made for an add that failed."""
    try:
        os.rmdir(folder)
    except OSError as e:
        log.warning("cannot remove the bitmaps folder path=%s error=%s", folder, e)


def _write_new(path, length, blocks):
    """Make path whole or not at all: PATH.tmp allocated to length, blocks [(offset,
    bytes)] written, synced, renamed, directory synced.  Raises OSError (ENOSPC)."""
    tmp = path + TMP
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, length)
            for offset, data in blocks:
                pwrite_all(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        unlink_if_there(tmp)
        raise


class RegionRecord:
    """STATE_DIR/bitmaps/regions, in memory and on disk."""

    def __init__(self, path, size, region_size, bits):
        self.path = path
        self.size = size
        self.region_size = region_size
        self._shift = region_size.bit_length() - 1
        self.nregions = len(bits)
        self._bits = bits
        # What the client path tests: _bits, or all clear while the file may
        # not hold what memory says (a failed write), so every change syncs.
        self._trusted = bits
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = []                # (first, end) groups waiting for a sync
        # The epoch in which the last change into each region began (0: none).
        self._touched = array("Q", bytes(8 * self.nregions))
        self._epoch = 1
        self.syncs = 0                   # slow paths taken (tests, the log)

    @classmethod
    def create(cls, folder, size):
        region = bitmapfile.region_size_for(size)
        n = bitmapfile.nregions(size, region)
        path = os.path.join(folder, REGIONS)
        _write_new(path, HEADER_BYTES + n, [(0, bitmapfile.regions_header(size, region)),
                                            (HEADER_BYTES, bytes(n))])
        return cls(path, size, region, bytearray(n))

    @classmethod
    def open(cls, saved, size):
        return cls(saved.path, size, saved.region_size, saved.bits)

    # -- the client path -------------------------------------------------------

    def cover(self, offset, length):
        """Before a change to [offset, offset+length) is issued: stamp its regions
        and make sure they are set on disk (the bitmaps are marked already)."""
        shift = self._shift
        first = offset >> shift
        if (offset + length - 1) >> shift == first:
            self._touched[first] = self._epoch
            if not self._trusted[first]:
                self._set(first, first + 1)
            return
        end = min(((offset + max(length, 1) - 1) >> shift) + 1, self.nregions)
        self._touched[first:end] = array("Q", (self._epoch,)) * (end - first)
        if self._trusted.find(_CLEAR, first, end) >= 0:
            self._set(first, end)

    def _set(self, first, end):
        """Set the group(s) around [first, end) durably.  Group commit: a writer
        queues its groups before it waits for the record, and whoever holds it
        next writes every queued group with one sync (a burst of first writes
        into many cleared regions pays a few syncs, not one each)."""
        first -= first % SET_GROUP
        end = min(end + (-end % SET_GROUP), self.nregions)
        with self._queue_lock:
            self._queued.append((first, end))
        with self._lock:
            if self._fd is None:
                raise OSError(errno.EIO, "bitmap region record closed")
            if self._trusted.find(_CLEAR, first, end) < 0:
                return                     # an earlier batch set ours
            with self._queue_lock:
                batch, self._queued = self._queued, []
            batch.append((first, end))     # ours, even if a failed batch took it
            lo = min(f for f, _ in batch)
            hi = max(e for _, e in batch)
            span = bytearray(self._bits[lo:hi])
            for f, e in batch:
                span[f - lo:e - lo] = _SET * (e - f)
            pwrite_all(self._fd, span, HEADER_BYTES + lo)
            os.fdatasync(self._fd)
            for f, e in batch:
                self._bits[f:e] = _SET * (e - f)
                if self._trusted is not self._bits:
                    self._trusted[f:e] = _SET * (e - f)
            self.syncs += 1
        # The groups live at least one checkpoint interval (a writer moving on
        # into one pays no second sync).
        stamp = array("Q", (self._epoch,))
        for f, e in batch:
            self._touched[f:e] = stamp * (e - f)

    # -- checkpoints (the checkpoint thread, under the bitmap set's lock) --------

    def next_epoch(self):
        """Start a new epoch; returns the one that ended."""
        epoch = self._epoch
        self._epoch = epoch + 1
        return epoch

    def candidates(self, epoch):
        """Set regions idle since before `epoch` (no change began into them in the
        epoch that just ended, nor since): those a checkpoint may clear."""
        bits, touched = self._bits, self._touched
        out = []
        i = bits.find(_SET)
        while i >= 0:
            if touched[i] < epoch:
                out.append(i)
            i = bits.find(_SET, i + 1)
        return out

    def clear(self, regions, changed):
        """Clear `regions` durably; the recording bitmaps' snapshots are saved.

        changed(): the regions where a bitmap gained a bit since its snapshot
        (they stay set).  Returns how many regions were cleared.
        """
        with self._lock:
            if self._fd is None:
                return 0
            bits = self._bits
            busy = changed()
            cleared = [r for r in regions if bits[r] and r not in busy]
            if not cleared:
                return 0
            for r in cleared:
                bits[r] = 0                              # (a) clear, then (b) look again
            busy = changed()
            for r in cleared:
                if r in busy:
                    bits[r] = 1
            try:
                pwrite_all(self._fd, bytes(bits), HEADER_BYTES)
                os.fdatasync(self._fd)
            except OSError:
                for r in cleared:
                    bits[r] = 1
                self._rewrite_after_failure()
                raise
            if self._trusted is not bits:
                self._trusted = bits
                log.info("bitmap region record writable again path=%s", self.path)
            return sum(1 for r in cleared if not bits[r])

    def region_shift(self):
        return self._shift

    def _rewrite_after_failure(self):
        """A failed write may have left cleared bytes in the page cache while memory
        says set: write memory back; if that fails too, every change syncs."""
        try:
            pwrite_all(self._fd, bytes(self._bits), HEADER_BYTES)
            os.fdatasync(self._fd)
        except OSError as e:
            log.error("bitmap region record write failed path=%s error=%s: every client "
                      "change syncs the record until a checkpoint succeeds", self.path, e)
            self._trusted = bytearray(self.nregions)

    def set_ranges(self):
        """(offset, length) of each run of set regions (what a crash may have changed)."""
        bits, shift = self._bits, self._shift
        out = []
        i = bits.find(_SET)
        while i >= 0:
            j = bits.find(_CLEAR, i)
            j = self.nregions if j < 0 else j
            out.append((i << shift, min(j << shift, self.size) - (i << shift)))
            i = bits.find(_SET, j) if j < self.nregions else -1
        return out

    def set_count(self):
        return self._bits.count(_SET)

    def close(self):
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class BitmapFile:
    """One persistent bitmap's file: a header and two copies (see bitmapfile.py)."""

    def __init__(self, path, header_bytes, stride, generation, copy):
        self.path = path
        self.header_bytes = header_bytes
        self.stride = stride
        self.generation = generation
        self.copy = copy                 # the copy that holds `generation`
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    @classmethod
    def prepare(cls, folder, file_id, name, size, granularity, recording, data):
        """Write NNNNNNNN.bitmap.tmp whole and synced (an add's reservation: the
        only bitmap step that needs new space).  install() puts it in place."""
        header = bitmapfile.bitmap_header(size, granularity, name)
        header_bytes, _, stride = bitmapfile.layout(size, granularity,
                                                    len(name.encode("utf-8")))
        path = os.path.join(folder, "%08d.bitmap" % file_id)
        tmp = path + TMP
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, header_bytes + 2 * stride)
                pwrite_all(fd, header, 0)
                pwrite_all(fd, bitmapfile.copy_block(1, recording, data), header_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            unlink_if_there(tmp)
            raise
        return PendingFile(path, header_bytes, stride)

    @classmethod
    def open(cls, saved):
        return cls(saved.path, saved.header_bytes, saved.stride, saved.generation, saved.copy)

    def save(self, data, recording):
        """Write the other copy with the next generation and sync it; raises OSError
        (the previous copy stays the valid one)."""
        other = 1 - self.copy
        offset = self.header_bytes + other * self.stride
        generation = self.generation + 1
        try:
            pwrite_all(self._fd, bitmapfile.copy_block(generation, recording, data), offset)
            os.fdatasync(self._fd)
        except OSError:
            # The page cache may hold the new copy although the sync failed: spoil
            # its magic, so a restart does not take a copy this save did not promise.
            try:
                pwrite_all(self._fd, bytes(COPY_HEADER_BYTES), offset)
            except OSError:
                pass
            raise
        self.generation, self.copy = generation, other

    def retire(self):
        """A remove's durable step: NNNNNNNN.bitmap -> .tmp (ignored, then removed,
        at start-up); restore() takes it back."""
        os.rename(self.path, self.path + TMP)
        try:
            fsync_dir(os.path.dirname(self.path))
        except OSError:
            os.rename(self.path + TMP, self.path)
            raise

    def restore(self):
        os.rename(self.path + TMP, self.path)
        fsync_dir(os.path.dirname(self.path))

    def discard(self):
        """After retire(): the file is gone for good."""
        self.close()
        unlink_if_there(self.path + TMP)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class PendingFile:
    """A bitmap file written as .tmp, not yet in place."""

    def __init__(self, path, header_bytes, stride):
        self.path = path
        self.header_bytes = header_bytes
        self.stride = stride

    def install(self):
        """Rename into place, sync the directory; returns the BitmapFile."""
        os.rename(self.path + TMP, self.path)
        try:
            fsync_dir(os.path.dirname(self.path))
        except OSError:
            os.rename(self.path, self.path + TMP)
            raise
        return BitmapFile(self.path, self.header_bytes, self.stride, 1, 0)

    def discard(self):
        unlink_if_there(self.path + TMP)


def remove_leftovers(state_dir):
    """*.tmp files of an add or remove that did not finish (after the checks)."""
    for path in bitmapfile.leftovers(state_dir):
        log.info("removing a leftover bitmap file path=%s", path)
        unlink_if_there(path)

