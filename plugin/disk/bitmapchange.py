"""Bitmap commands as one all-or-nothing change (QEMU's transaction model).

    change = disk.bitmaps.change()        # under disk.quiesce()
    try:
        change.add("b1", persistent=True)
        change.merge("b1", [(None, "b0")])
        change.commit()                   # durable, or undone and raised
    except BaseException:
        change.abort()
        raise

Each command checks its arguments with QEMU 7.2's texts (CommandError) and
applies itself in memory at once, keeping what undoes it, so the commands
after it see its result (add then merge into the new bitmap).  The only step
that may need new space, writing an added bitmap's file, happens here too
(as NNNNNNNN.bitmap.tmp, synced): an ENOSPC fails the command that caused it.
commit() makes the result durable: removed files are retired first (so a
name removed and added again is never in two files), then added files are
put in place, then the changed bitmaps are saved (a new copy each,
bitmaprecord.py); each step is atomic on its own, and none leaves a bitmap
holding less than it should.  A failure there (EIO) undoes the change in memory and, as
far as the storage lets, on disk, and raises the OSError.

The change holds the bitmap set's lock from creation to commit/abort, so no
checkpoint saves a state it has not committed.
"""

import logging

from ..core.errors import CommandError
from ..core.packedbitmap import PackedBitmap
from .bitmapfile import MAX_GRANULARITY, MAX_NAME, MIN_GRANULARITY
from .bitmaprecord import BitmapFile

log = logging.getLogger(__name__)


def not_found(name):
    return CommandError("Dirty bitmap '%s' not found" % name)


def busy_error(name):
    return CommandError("Bitmap '%s' is currently in use by another operation and cannot "
                        "be used" % name)


def check_granularity(granularity):
    if granularity < MIN_GRANULARITY or granularity & (granularity - 1):
        raise CommandError("Granularity must be power of 2 and at least 512")
    if granularity > MAX_GRANULARITY:
        raise CommandError("Granularity exceeds maximum (%d bytes)" % MAX_GRANULARITY)


class Change:
    def __init__(self, bitmaps):
        self._set = bitmaps
        bitmaps.lock.acquire()
        self._open = True
        self._undo = []            # callables, run last to first by abort()
        self._added = []           # persistent bitmaps whose file is pending
        self._removed = []         # bitmaps taken out of the set
        self._saves = []           # persistent bitmaps whose saved copy must be rewritten

    # -- lookups --------------------------------------------------------------

    def _usable(self, name):
        bm = self._set.lookup(name)
        if bm.busy:
            raise busy_error(name)
        return bm

    def _save_later(self, bm):
        if bm.persistent and bm not in self._saves:
            self._saves.append(bm)

    # -- the commands -----------------------------------------------------------

    def add(self, name, granularity=None, persistent=False, disabled=False):
        if not name:
            raise CommandError("Bitmap name cannot be empty")
        if granularity is None:
            granularity = self._set.default_granularity
        check_granularity(granularity)
        if name in self._set.names():
            raise CommandError("Bitmap already exists: %s" % name)
        if len(name) > MAX_NAME:
            raise CommandError("Bitmap name too long: %s" % name)
        bits = PackedBitmap(self._set.size, granularity)
        bm = self._set.new_bitmap(name, bits, persistent, recording=not disabled)
        if persistent:
            if self._set.folder is None:
                raise CommandError("Can't make bitmap '%s' persistent: the disk has no state "
                                   "directory" % name)
            self._set.ensure_record()
            data, bm.saved_changes = bits.snapshot()
            bm.pending = _reserve(self._set, name, granularity, not disabled, data)
            self._added.append(bm)
        self._set.insert(bm)
        self._undo.append(lambda: self._set.take(bm))
        log.info("dirty bitmap add name=%r granularity=%d persistent=%s disabled=%s",
                 name, granularity, persistent, disabled)
        return bm

    def remove(self, name):
        bm = self._usable(name)
        index = self._set.take(bm)
        self._removed.append(bm)
        self._undo.append(lambda: self._set.insert(bm, index))
        log.info("dirty bitmap remove name=%r", name)

    def clear(self, name):
        bm = self._usable(name)
        data, _ = bm.bits.snapshot()
        bm.bits.clear()
        self._save_later(bm)
        self._undo.append(lambda: bm.bits.load(data))
        log.info("dirty bitmap clear name=%r", name)

    def give_back(self, name, ranges):
        """A job hands ranges back to a bitmap it holds busy (drive-backup's
        bitmap-mode: what it did not take out for good)."""
        bm = self._set.lookup(name)
        data, _ = bm.bits.snapshot()
        for off, n in ranges:
            bm.bits.mark(off, n)
        self._save_later(bm)
        self._undo.append(lambda: bm.bits.load(data))
        log.info("dirty bitmap give-back name=%r bytes=%d", name, sum(n for _, n in ranges))

    def enable(self, name):
        self._set_recording(self._usable(name), True)

    def disable(self, name):
        self._set_recording(self._usable(name), False)

    def _set_recording(self, bm, recording):
        old = bm.recording
        bm.recording = recording
        self._save_later(bm)
        self._undo.append(lambda: setattr(bm, "recording", old))
        log.info("dirty bitmap %s name=%r", "enable" if recording else "disable", bm.name)

    def merge(self, target, sources):
        """target becomes the union of itself and sources, [(node or None, name)]
        (node: another disk's name is not found).  An empty list changes nothing."""
        dst = self._set.lookup(target)
        union = PackedBitmap(self._set.size, dst.granularity)
        for node, name in sources:
            if node is not None and node != self._set.disk.device:
                raise CommandError("Node '%s' not found" % node)
            union.merge(self._usable(name).bits)
        if dst.busy:
            raise busy_error(target)
        if not sources:
            return
        data, _ = dst.bits.snapshot()
        dst.bits.merge(union)
        self._save_later(dst)
        self._undo.append(lambda: dst.bits.load(data))
        log.info("dirty bitmap merge target=%r sources=%r", target, [n for _, n in sources])

    # -- the end ---------------------------------------------------------------

    def commit(self):
        """Make the change durable and let the guard see it; on OSError everything
        is undone (see the module docstring) and the error raised."""
        installed, saved, retired = [], [], []
        try:
            # Removed files go first: a name removed and added again in one change
            # must never be in two files (a start-up would refuse the directory).
            for bm in self._removed:
                if bm.file is not None:
                    bm.file.retire()
                    retired.append(bm)
            for bm in self._added:
                if self._set.contains(bm):
                    bm.file = bm.pending.install()
                    bm.pending = None
                    installed.append(bm)
            for bm in self._saves:
                if self._set.contains(bm):
                    data, changes = bm.bits.snapshot()
                    bm.file.save(data, bm.recording)
                    bm.saved_changes = changes
                    saved.append(bm)
        except OSError:
            self._undo_durable(installed, saved, retired)
            raise
        for bm in retired:
            bm.file.discard()
        self._finish()

    def _undo_durable(self, installed, saved, retired):
        self._undo_memory()
        for bm in saved:
            data, changes = bm.bits.snapshot()

            def save(bm=bm, data=data):
                bm.file.save(data, bm.recording)
            if _try(save, "save bitmap %r back" % bm.name):
                bm.saved_changes = changes
        for bm in installed:
            def drop(bm=bm):
                bm.file.retire()
                bm.file.discard()
            _try(drop, "remove the file of bitmap %r" % bm.name)
            bm.file = None
        for bm in retired:
            _try(bm.file.restore, "restore the file of bitmap %r" % bm.name)
        self._finish()

    def abort(self):
        """Undo everything this change did (nothing of it was made durable)."""
        if self._open:
            self._undo_memory()
            self._finish()

    def _undo_memory(self):
        for undo in reversed(self._undo):
            undo()
        self._undo = []
        for bm in self._added:
            if bm.pending is not None:
                bm.pending.discard()
                bm.pending = None

    def _finish(self):
        if self._open:
            for bm in self._added:
                if bm.pending is not None:        # added, then removed in the same change
                    bm.pending.discard()
                    bm.pending = None
            self._open = False
            self._set.refresh()
            self._set.lock.release()


def _reserve(bitmaps, name, granularity, recording, data):
    return BitmapFile.prepare(bitmaps.folder, bitmaps.next_file_id(), name, bitmaps.size,
                              granularity, recording, data)


def _try(fn, what):
    try:
        fn()
        return True
    except OSError as e:
        log.error("undoing a failed bitmap change: cannot %s error=%s", what, e)
        return False
