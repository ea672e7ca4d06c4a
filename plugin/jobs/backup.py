"""The backup job (drive-backup): the disk as it was when the job started, to a target.

As QEMU's block/backup.c with its copy-before-write filter: the job starts
a point in time (plugin/blockcopy/snapshot.py: a Disk guard that saves the
old bytes of a granule the backup still needs before a client change
reaches it), then copies the point-in-time view to the target with the
copy machinery (blockcopy/pipeline.py, flushes.py, link.py).  No READY: the
job ends with BLOCK_JOB_COMPLETED once the target durably holds every
needed granule, or BLOCK_JOB_CANCELLED.

sync: full (everything; zero ranges are zeroed, or skipped where the target
reads as zeros), top (what the overlay holds), none (only what
copy-before-write saves, until the job is cancelled), incremental/bitmap
(a dirty bitmap's ranges: see the bitmap hooks).  Target `export:NAME`
(pull mode): nothing is copied; the view is served as the read-only NBD
export NAME on the disk's socket until the job is cancelled.

Policies: on-source-error for reads of the view, on-target-error for
target writes and flushes (CopyJob._handle_failures); a stopped backup
keeps its point in time while paused.  on-cbw-error: break-guest-write
(default) fails the client's change when its save fails; break-snapshot
ends the job with the error and lets the change through.

Durability: the snapshot's files (needed, saved, scratch) are durable
before a change proceeds; a needed granule is cleared only after a target
flush covering its copy succeeded (every CHECKPOINT_INTERVAL or 1/32 of the
disk: Cadence).  A restored backup reopens them and copies what is still
needed: the same point in time, and nothing copied twice that the target
durably held.
"""

import logging
import os

from ..blockcopy.bytemap import ByteMap
from ..blockcopy.cadence import Cadence
from ..blockcopy.snapshot import PointInTime
from ..core.errors import CommandError
from .copyjob import NEXT_TURN, STOP, CopyJob

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_BUF_SIZE = 16 * MiB
MAX_CHUNK = 1 * MiB
EXPORT_PREFIX = "export:"
FROZEN = ".frozen"                # the bitmap's contents at the start (sync=bitmap)
IDLE_INTERVAL = 0.5               # sync=none / pull: how often an idle job looks around


class BackupJob(CopyJob):
    changeable_options = frozenset({"on_source_error", "on_target_error"})

    def __init__(self, job_id, bus, disk, target, files, sync="full", granularity=None,
                 buf_size=None, speed=0, on_source_error="report", on_target_error="report",
                 on_cbw_error="break-guest-write", auto_finalize=True, auto_dismiss=True,
                 clock=None, reconnect_delay=0.0, restored=False, max_chunk=None,
                 exports=None, bitmap=None, bitmap_mode=None, target_instance=None):
        """files: STATE_DIR/jobs/ID, the prefix of the snapshot's files.
        exports: the server's export table (pull mode registers its view there)."""
        granularity = granularity or disk.store.cluster_size
        chunk = max(granularity, min(max_chunk or MAX_CHUNK, 64 * MiB))
        buf_size = max(buf_size or DEFAULT_BUF_SIZE, chunk)
        pull = target.startswith(EXPORT_PREFIX)
        super().__init__(job_id, "backup", bus, disk, target, granularity, chunk, buf_size,
                         speed, auto_finalize, auto_dismiss, clock, reconnect_delay, None,
                         True if pull else restored, target_instance, kind="Backup")
        self._restored = restored
        self.export = target[len(EXPORT_PREFIX):] if pull else None
        self._exports = exports
        self.sync = sync
        self.granularity, self.chunk, self.buf_size = granularity, chunk, buf_size
        self.max_chunk = max_chunk
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.on_cbw_error = on_cbw_error
        self.files = files
        self.bitmap_name, self.bitmap_mode = bitmap, bitmap_mode
        self.created = None
        self.pit = None
        self._frozen = None               # ByteMap: the bitmap's contents at the start
        self._answered = []               # copies answered since the last flush started
        copied = self.copy.on_copied

        def on_copied(offset, length):
            copied(offset, length)
            self._answered.append((offset, length))
            self.pit.note_answered(offset, length)

        self.copy.on_copied = on_copied
        self.flushes.on_start = self._flush_started
        self.flushes.after = self._after_flush
        self._checkpoints = Cadence(disk.size, self.clock.now)
        self.set_progress(0, 0)

    # -- the point in time ---------------------------------------------------

    def _needed_at_start(self):
        """What the backup needs, with clients quiesced: the point in time's scope."""
        store = self.disk.store
        if self.export is not None:
            return [(0, self.disk.size)]      # a pull-mode view: the whole disk, consistent
        if self.sync == "bitmap":
            return self._frozen_runs()
        if self.sync == "top" and getattr(store, "has_base", False):
            return list(store.overlay_runs())
        return [(0, self.disk.size)]

    def attach(self):
        """Start the point in time (before start(), or first thing in run()).

        A new job takes it with clients quiesced, so every change after this
        passes the copy-before-write guard; a restored one reopens its files.
        """
        if self.pit is not None:
            return
        disk = self.disk
        with disk.quiesce():
            if self.bitmap_name is not None:
                self._take_bitmap()
            if self._restored:
                snap = PointInTime(disk.store, disk.size, self.granularity, self.copy.ranges,
                                   self.files, break_guest_write=self._breaks_guest())
            else:
                snap = PointInTime(disk.store, disk.size, self.granularity, self.copy.ranges,
                                   self.files, self._needed_at_start(),
                                   break_guest_write=self._breaks_guest())
            disk.add_guard(snap)
        self.pit = snap
        snap.on_broken = self.kick
        self.copy.store = snap
        self.copy.copy_mask = snap.needed_within
        if self.export is not None:
            if self._exports is not None:
                self._exports.add(self.export, snap)
        elif self.sync == "none":
            snap.on_saved = self._saved
        else:
            for off, n in snap.needed_runs():
                self.bitmap.mark(off, n)
        log.info("Backup %s job=%s sync=%s target=%s needed=%d saved=%d bytes",
                 "resumes" if self._restored else "starts", self.id, self.sync,
                 self.target_name, snap.needed_bytes(),
                 sum(e - f for f, e in snap.saved.runs(1)) * self.granularity)

    # -- the bitmap (sync=bitmap/incremental, bitmap-mode) ----------------------------

    def _take_bitmap(self):
        """With clients quiesced: freeze the bitmap's contents (durably, in
        ID.frozen), clear the bitmap (it records the writes after the point in
        time from now on: QEMU's successor) and hold it busy.  A restored job
        reopens its frozen copy and holds the bitmap again."""
        bitmaps = self.disk.bitmaps
        path = self.files + FROZEN
        try:
            bm = bitmaps.lookup(self.bitmap_name)
        except CommandError:
            bm = None
        if self._restored:
            if os.path.exists(path):
                self._frozen = ByteMap(path, self._frozen_count(bm))
            if bm is None:
                log.warning("Backup bitmap gone job=%s bitmap=%s: its bitmap-mode cannot be "
                            "applied at the end", self.id, self.bitmap_name)
                return
            if not bm.busy:
                bitmaps.set_busy(self.bitmap_name)
            return
        self._granule = bm.granularity
        frozen = ByteMap(path, self._frozen_count(bm), 0, create=True)
        runs, _ = bm.bits.runs()
        shift = bm.granularity.bit_length() - 1
        for off, n in runs:
            first, end = off >> shift, (off + n + bm.granularity - 1) >> shift
            frozen.bytes[first:end] = b"\x01" * (end - first)
        frozen.write_all()
        self._frozen = frozen
        change = bitmaps.change()
        try:
            change.clear(self.bitmap_name)
        except BaseException:
            change.abort()
            raise
        change.commit()
        bitmaps.set_busy(self.bitmap_name)

    def _frozen_count(self, bm):
        granularity = bm.granularity if bm is not None else self._frozen_granularity()
        self._granule = granularity
        return (self.disk.size + granularity - 1) // granularity

    def _frozen_granularity(self):
        size = os.path.getsize(self.files + FROZEN)
        granularity = 512
        while (self.disk.size + granularity - 1) // granularity > size:
            granularity <<= 1
        return granularity

    def _frozen_runs(self):
        g = self._granule
        return [(f * g, min(e * g, self.disk.size) - f * g)
                for f, e in self._frozen.runs(1)] if self._frozen is not None else []

    def _give_back(self, succeeded):
        """The end: what of the frozen contents goes back into the bitmap
        (QEMU's bitmap-mode), then the bitmap is free again."""
        if self.bitmap_name is None:
            return
        bitmaps = self.disk.bitmaps
        mode = self.bitmap_mode or "on-success"
        if mode == "never" or (mode == "on-success" and not succeeded):
            back = self._frozen_runs()
        elif mode == "always" and not succeeded and self.pit is not None:
            back = [r for off, n in self._frozen_runs()
                    for r in self.pit.needed_within(off, n)]
        else:
            back = []
        try:
            bm = bitmaps.lookup(self.bitmap_name)
        except CommandError:
            return
        if back:
            with self.disk.quiesce():
                change = bitmaps.change()
                try:
                    change.give_back(self.bitmap_name, back)
                except BaseException:
                    change.abort()
                    raise
                change.commit()
        if bm.busy:
            bitmaps.set_busy(self.bitmap_name, False)
        log.info("Backup bitmap job=%s bitmap=%s mode=%s succeeded=%s given_back=%d",
                 self.id, self.bitmap_name, mode, succeeded, sum(n for _, n in back))

    def commit(self):
        self._give_back(True)

    def abort(self):
        # Copies stuck on a silent target hold granules a client may wait for.
        self.link.close()
        self.copy.abandon()
        self._give_back(False)

    def _breaks_guest(self):
        return self.on_cbw_error != "break-snapshot"

    def _saved(self, offset, length):
        """sync=none: what copy-before-write saved is what the job copies."""
        self.bitmap.mark(offset, length)
        self.kick()

    def _detach(self):
        snap = self.pit
        if snap is None:
            return
        if self.export is not None and self._exports is not None:
            self._exports.remove(self.export)
        with self.disk.quiesce():
            self.disk.remove_guard(snap)
        snap.close()

    # -- the durable record ------------------------------------------------------

    def settings(self):
        return {"target": self.target_address, "sync": self.sync,
                "granularity": self.granularity, "buf-size": self.buf_size,
                "on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "on-cbw-error": self.on_cbw_error,
                "reconnect-delay": self.reconnect_delay, "created": self.created,
                "max-chunk": self.max_chunk, "bitmap": self.bitmap_name,
                "target-instance": self.trust.instance,
                "bitmap-mode": self.bitmap_mode}

    def restore_state(self, paused, io_status, offset, total, ready_seen):
        super().restore_state(paused, io_status, offset, total, ready_seen)
        self.copy.copied = offset

    def checkpoints(self):
        return True

    def remove_files(self):
        if self.pit is not None:
            self.pit.remove()
        if self._frozen is not None:
            self._frozen.remove()

    def change(self, on_source_error=None, on_target_error=None):
        if on_source_error is not None:
            self.on_source_error = on_source_error
        if on_target_error is not None:
            self.on_target_error = on_target_error
        log.info("Backup changed job=%s on_source_error=%s on_target_error=%s", self.id,
                 self.on_source_error, self.on_target_error)

    def policies(self):
        return {"on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "on-cbw-error": self.on_cbw_error}

    # -- flushes: what the target durably holds ------------------------------------

    def _flush_started(self, flush):
        flush.payload, self._answered = self._answered, []

    def _after_flush(self, flush):
        """A flush succeeded: what it covers is no longer needed (durably)."""
        if flush.payload:
            self.pit.copied(flush.payload)
        if self.durable is not None:
            self._update_progress()
            self._save()

    # -- the job thread ---------------------------------------------------------------

    def run(self):
        try:
            self._run()
        finally:
            if self.suspended:
                self._shutdown_checkpoint()

    def _run(self):
        self.attach()
        if self.export is not None:
            log.info("Backup serves its point in time job=%s export=%s", self.id, self.export)
            while not self.pause_point():
                self._check_broken()
                if self.sleep(IDLE_INTERVAL):
                    return
            return
        copy, flushes, snap = self.copy, self.flushes, self.pit
        self.link.connect()
        if not self.link.await_open(self, self.disk.size, lambda: self.on_target_error):
            return
        if self._restored:
            self._resume_answered()
        else:
            self.trust.connected([], flushes, self.id)
        if self.sync == "full" and not self._restored:
            copy.skip_zero = self.link.reads_zero(self.disk.size)
        pos = 0
        while True:
            if self._pause_point():
                return
            self._check_broken()
            pos, then = self._copy_turn(pos)
            if then == STOP:
                return
            if then == NEXT_TURN:
                continue
            if not flushes.queue and self._checkpoints.due(copy.copied):
                self._checkpoints.mark(copy.copied)
                self._start_flush(to_ready=False)
            if self.target.in_flight():
                continue
            now = self.clock.now()
            if copy.pending():
                if copy.retries.gate > now:
                    self.sleep(max(0.01, copy.retries.gate - now))
                continue
            if copy.retries:
                self.sleep(max(0.01, copy.retries.next_due() - now))
                continue
            if flushes.copied_since_flush:
                if copy.retries.gate_open():
                    self._start_flush(to_ready=False)
                else:
                    self.sleep(max(0.01, copy.retries.gate - now))
                continue
            if self.sync == "none":
                self.sleep(IDLE_INTERVAL)     # until cancelled; saves wake it (kick)
                continue
            left = snap.needed_runs()
            if not left:
                break
            # Needed, yet neither dirty nor in flight (a failed flush's ranges
            # under another mask): copy them again.
            for off, n in left:
                self.bitmap.mark(off, n)
        self._update_progress()
        log.info("Backup copied job=%s bytes=%d saves=%d", self.id, copy.copied, snap.saves)

    def _resume_answered(self):
        """After a restart: copies the target answered but no flush covered are
        still on it when it is the very instance that answered (the same file in
        this boot, the same server process: TargetTrust); then they only need a
        flush, not a copy.  Any other instance: copy them again, and forget the
        old answers before this instance is recorded."""
        snap = self.pit
        ranges = snap.answered_needed_runs()
        self.trust.inherited_copied = False       # nothing to compare: copied again
        if ranges and self.trust.trusts():
            for off, n in ranges:
                self.bitmap.clear(off, n)
            self._answered += ranges
            self.trust.connected(ranges, self.flushes, self.id)
            return
        if ranges:
            snap.forget_answered()
        self.trust.connected([], self.flushes, self.id)

    def _check_broken(self):
        if self.pit is not None and self.pit.broken is not None:
            raise self.pit.broken

    def clean(self):
        # The link first: copies still in flight hold granules a client's
        # copy-before-write may be waiting for, and the detach waits for clients.
        self.link.close()
        self.copy.abandon()
        self._detach()
