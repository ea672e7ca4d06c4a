"""The disk's dirty bitmaps: the set of them, the marker that marks them, checkpoints.

A BitmapSet belongs to the Disk (disk.bitmaps).  Every recording bitmap
holds every byte a client changed (write, zero, trim) since it was created
or cleared: the set gives the Disk a marker (plugin/disk/disk.py) that marks
the recording bitmaps in memory before the change is issued to the store (so
also before it is acknowledged), then has the region record
(bitmaprecord.py) cover the change when any persistent bitmap records.
Changes that fail are marked too (more is allowed, never less).  The marker
is a closure made for the set as it is (refresh()), so a client write pays
one call per bitmap and one for the record, and nothing without bitmaps.

Commands (add, remove, clear, enable, disable, merge) go through a Change
(bitmapchange.py): all or nothing, under disk.quiesce(), so no client
change is in progress while they run.  Persistent bitmaps are saved at
checkpoints (a thread: every CHECKPOINT_SECONDS while regions may be
cleared, sooner after a flush) and at close; the durability rule is in
bitmaprecord.py and docs/bitmaps.md.

Jobs hold a bitmap busy (set_busy): a busy bitmap refuses remove, clear,
enable, disable and merges into or from it, as QEMU's.
"""

import logging
import re
import threading
import time

from ..core import packedbitmap
from ..core.packedbitmap import PackedBitmap
from ..core.threads import Thread
from . import bitmapfile, bitmaprecord
from .bitmapchange import Change, busy_error, not_found
from .bitmaprecord import BitmapFile, RegionRecord
from .statecheck import BITMAPS

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 5.0       # a checkpoint at least this often while regions are set
FLUSH_CHECKPOINT_SECONDS = 1.0  # a flush brings the next one forward, to at most this often
_NONZERO = re.compile(rb"[^\x00]")


class Bitmap:
    """One named bitmap of the disk."""

    __slots__ = ("name", "bits", "persistent", "recording", "busy", "file", "saved_changes",
                 "pending")

    def __init__(self, name, bits, persistent=False, recording=True, file=None):
        self.name = name
        self.bits = bits
        self.persistent = persistent
        self.recording = recording
        self.busy = False
        self.file = file                   # BitmapFile of a persistent bitmap
        self.saved_changes = bits.changes  # what the saved copy holds
        self.pending = None                # PendingFile of an add not yet committed

    @property
    def granularity(self):
        return self.bits.granularity

    def info(self):
        """QEMU's BlockDirtyInfo."""
        return {"name": self.name, "recording": self.recording, "persistent": self.persistent,
                "busy": self.busy, "granularity": self.granularity,
                "count": self.bits.dirty_bytes()}


class BitmapSet:
    """Every bitmap of one disk; the disk's marker while any records."""

    def __init__(self, disk, state_path, size, default_granularity,
                 interval=CHECKPOINT_SECONDS):
        self.disk = disk
        self.state_path = state_path
        self.folder = None if state_path is None else "%s/%s" % (state_path, BITMAPS)
        self.size = size
        self.default_granularity = default_granularity
        self.interval = interval
        self.lock = threading.RLock()      # commands and checkpoints, one at a time
        self._bitmaps = []                 # creation order
        self._record = None                # RegionRecord once a persistent bitmap was made
        self._next_file = 1
        self._covering = None              # the record while a persistent bitmap records
        self._wake = threading.Event()
        self._stopping = False
        self._thread = None
        self._last_checkpoint = 0.0
        self.recovered = 0                 # bytes of regions a crash left set (log, tests)

    @classmethod
    def open(cls, disk, state_path, size, default_granularity, **kw):
        """Load the persistent bitmaps (the state directory passed its checks)."""
        bitmaps = cls(disk, state_path, size, default_granularity, **kw)
        regions, saved = bitmapfile.read_bitmaps(state_path, size)
        bitmaprecord.remove_leftovers(state_path)
        if regions is not None:
            bitmaps._record = RegionRecord.open(regions, size)
        for s in sorted(saved, key=lambda s: s.file_id):
            bits = PackedBitmap(size, s.granularity, s.data)
            bitmaps._bitmaps.append(Bitmap(s.name, bits, True, s.recording, BitmapFile.open(s)))
            bitmaps._next_file = max(bitmaps._next_file, s.file_id + 1)
        record = bitmaps._record
        if record is not None and record.set_count():
            # After a crash: a recording bitmap is its saved copy plus every region
            # a change may have reached since (docs/bitmaps.md).
            ranges = record.set_ranges()
            for bm in bitmaps._bitmaps:
                if bm.recording:
                    for offset, length in ranges:
                        bm.bits.mark(offset, length)
            bitmaps.recovered = sum(length for _, length in ranges)
            log.info("dirty bitmaps: regions set at the last stop marked in every recording "
                     "bitmap bytes=%d bitmaps=%d", bitmaps.recovered,
                     sum(1 for b in bitmaps._bitmaps if b.recording))
        for bm in bitmaps._bitmaps:
            log.info("dirty bitmap loaded name=%r granularity=%d recording=%s count=%d",
                     bm.name, bm.granularity, bm.recording, bm.bits.dirty_bytes())
        bitmaps.refresh()
        return bitmaps

    # -- the client path (plugin/disk/disk.py's marker) ---------------------------

    def refresh(self):
        """Give the disk the marker for the set as it is now (clients quiesced)."""
        recording = tuple(b.bits for b in self._bitmaps if b.recording)
        persistent = any(b.persistent and b.recording for b in self._bitmaps)
        self._covering = self._record if persistent else None
        self.disk.set_marker(_marker(recording, self._covering) if recording else None)

    # -- lookups and jobs ---------------------------------------------------------

    def lookup(self, name):
        for bm in self._bitmaps:
            if bm.name == name:
                return bm
        raise not_found(name)

    def names(self):
        return [b.name for b in self._bitmaps]

    def info(self):
        """BlockDirtyInfo of every bitmap, the newest first (as QEMU lists them)."""
        return [b.info() for b in reversed(self._bitmaps)]

    def extents(self, name, offset=0, length=None, limit=None):
        """The dirty ranges of a bitmap: ([(offset, length)], next or None)."""
        return self.lookup(name).bits.runs(offset, length, limit)

    def set_busy(self, name, busy=True):
        """A job takes (busy=True) or gives back a bitmap; a busy one refuses the
        commands that would change it, and a second taker."""
        with self.lock:
            bm = self.lookup(name)
            if busy and bm.busy:
                raise busy_error(name)
            bm.busy = busy
            return bm

    def change(self):
        """A Change: commands applied all or nothing (call under disk.quiesce())."""
        return Change(self)

    # -- used by Change -------------------------------------------------------------

    @staticmethod
    def new_bitmap(name, bits, persistent, recording):
        return Bitmap(name, bits, persistent, recording)

    def insert(self, bm, index=None):
        self._bitmaps.insert(len(self._bitmaps) if index is None else index, bm)

    def take(self, bm):
        index = self._bitmaps.index(bm)
        del self._bitmaps[index]
        return index

    def contains(self, bm):
        return any(b is bm for b in self._bitmaps)

    def ensure_record(self):
        """The folder and the region record, made (durably) for the first persistent bitmap."""
        if self._record is None:
            made = bitmaprecord.make_folder(self.folder)
            try:
                self._record = RegionRecord.create(self.folder, self.size)
            except OSError:
                if made:
                    bitmaprecord.remove_folder(self.folder)
                raise
        return self._record

    def next_file_id(self):
        n = self._next_file
        self._next_file += 1
        return n

    # -- checkpoints ----------------------------------------------------------------

    def flushed(self):
        """A client flush completed: bring the next checkpoint forward."""
        if self._covering is not None:
            self._wake.set()

    def checkpoint(self, final=False):
        """Save the recording persistent bitmaps that changed, then clear the idle
        regions their saved copies now hold.  Returns the regions cleared."""
        with self.lock:
            record = self._record
            if record is None:
                return 0
            epoch = record.next_epoch()
            regions = record.candidates(epoch + 1 if final else epoch)
            if not regions:
                return 0
            snaps = []
            for bm in self._bitmaps:
                if bm.persistent and bm.recording:
                    data, changes = bm.bits.snapshot()
                    if changes != bm.saved_changes:
                        bm.file.save(data, True)
                        bm.saved_changes = changes
                    snaps.append((bm, data, changes))
            shift = record.region_shift()
            return record.clear(regions, lambda: _gained(snaps, shift, record.nregions))

    def start(self):
        """after_fork: the checkpoint thread."""
        if self._thread is None:
            self._thread = Thread(target=self._run, name="bitmap-checkpoints",
                                  daemon=True)
            self._thread.start()

    def _run(self):
        while True:
            woken = self._wake.wait(self.interval)
            if self._stopping:
                return
            self._wake.clear()
            now = time.monotonic()
            if woken and now - self._last_checkpoint < FLUSH_CHECKPOINT_SECONDS:
                continue
            self._last_checkpoint = now
            try:
                cleared = self.checkpoint()
                if cleared:
                    log.debug("bitmap checkpoint cleared=%d", cleared)
            except OSError as e:
                log.warning("bitmap checkpoint failed error=%s: regions stay set", e)
            except Exception:                # a bug must not end the checkpoints silently
                log.exception("bitmap checkpoint failed: regions stay set")

    def close(self):
        """cleanup: stop the thread, save everything (a clean stop leaves no set
        region), close the files."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:
            try:
                self.checkpoint(final=True)
            except OSError as e:
                log.error("saving the dirty bitmaps at stop failed error=%s: their regions "
                          "stay set (marked again at the next start)", e)
            for bm in self._bitmaps:
                if bm.file is not None:
                    bm.file.close()
            if self._record is not None:
                self._record.close()


def _gained(snaps, shift, nregions):
    """Regions where a bitmap has a bit its snapshot lacks (marked after it)."""
    out = set()
    for bm, data, changes in snaps:
        now, count = bm.bits.snapshot()
        if count == changes:
            continue
        diff = (int.from_bytes(now, "little") ^ int.from_bytes(data, "little")).to_bytes(
            len(now), "little")
        g = bm.granularity
        for m in _NONZERO.finditer(diff):
            j = m.start()
            first = (j * 8 * g) >> shift
            last = min(((j * 8 + 8) * g - 1) >> shift, nregions - 1)
            out.update(range(first, last + 1))
    return out


def _marker(recording, record):
    """fn(offset, length): mark every recording bitmap, then cover the change in the
    region record (None: no persistent bitmap records)."""
    mark = packedbitmap.marker(recording)
    if record is None:
        return mark
    cover = record.cover

    def mark_and_cover(offset, length):
        mark(offset, length)
        cover(offset, length)
    return mark_and_cover
