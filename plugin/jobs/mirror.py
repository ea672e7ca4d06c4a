"""The mirror job (drive-mirror): copy the served disk to a target while it is in use.

Phases, as QEMU's block/mirror.c:

1. Initial dirty set by sync mode (full, top, none: CopyPipeline.mark_initial;
   incremental/bitmap: a dirty bitmap's ranges, for a target that already holds
   the disk as it was when the bitmap was created or cleared: a delta move).
   Client writes are tracked from the start by a disk listener (_on_change).
2. Copy loop (run): the copy pipeline (plugin/blockcopy/pipeline.py) takes
   dirty runs, reads the source and writes the target, up to buf-size in
   flight; the flush pipeline (flushes.py) flushes and checkpoints.
3. Nothing dirty and nothing in flight: flush the target, then READY
   (_after_flush: the one place a mirror becomes ready).  Keep copying new
   writes, and flush about once a second while there are any.
4. complete (or a soft cancel): prepare() closes the disk's gate (no client
   request runs), copies what is left, flushes the target, and on complete
   pivots the disk to the target.

copy-mode=write-blocking: client writes also go to the target synchronously
(blockcopy/writeblocking.py), so the job converges under any write load.

Errors (docs/errors.md): the pipeline records failed reads and writes; the
job lets every request in flight finish, then _handle_failures applies the
policy once per operation through Job.report_io_error (the one decision
point): report ends the job, ignore hands the ranges to the retry schedule
(back-off), stop pauses (report_io_error returns on resume) and retries at
once.  Errors in prepare() end the job whatever the policy (the disk is
quiesced: pausing would hold every client), and so does a target that
answers nothing for FINAL_SYNC_TIMEOUT (+ reconnect-delay) once complete or
cancel was asked.

Durability (docs/jobs.md): with an intent log the job is a Disk guard, and
every flush is a checkpoint (flushes.py).  A restored job (restored=True)
starts from the log's regions and connects in run(), where a failure is an
I/O error for on-target-error; its COPIED regions are trusted (the same
target instance: blockcopy/link.py TargetTrust) or compared (verify.py).

The parts, and where they live:
    blockcopy/pipeline.py     CopyPipeline: dirty bitmap, reads, writes, in flight
    blockcopy/flushes.py      FlushPipeline: target flushes, checkpoints, COPIED marks
    blockcopy/link.py         TargetLink (connect, reconnect), TargetTrust (instance)
    blockcopy/verify.py       Comparison: a restored job's COPIED regions
    blockcopy/writeblocking.py WriteThrough: copy-mode=write-blocking
"""

import logging

from ..blockcopy.writeblocking import WriteThrough
from ..core.errors import CommandError, errno_of
from .copyjob import FINAL_SYNC_TIMEOUT  # noqa: F401  (the bound, for tests)
from .syncjob import SyncedCopyJob

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_BUF_SIZE = 16 * MiB
MAX_CHUNK = 1 * MiB


class MirrorJob(SyncedCopyJob):
    changeable_options = frozenset({"copy_mode", "on_source_error", "on_target_error"})

    def __init__(self, job_id, bus, disk, target, sync="full", granularity=None,
                 buf_size=None, speed=0, on_source_error="report", on_target_error="report",
                 copy_mode="background", auto_finalize=True, auto_dismiss=True, pivot=None,
                 clock=None, reconnect_delay=0.0, intent=None, restored=False,
                 target_instance=None, bitmap=None, target_is_zero=False):
        granularity = granularity or disk.store.cluster_size
        chunk = max(granularity, MAX_CHUNK)
        buf_size = buf_size or DEFAULT_BUF_SIZE
        super().__init__(job_id, "mirror", bus, disk, target, granularity, chunk, buf_size,
                         speed, auto_finalize, auto_dismiss, clock, reconnect_delay, intent,
                         restored, target_instance)
        self.sync = sync
        self.granularity, self.chunk, self.buf_size = granularity, chunk, buf_size
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.copy_mode = copy_mode
        self.bitmap_name = bitmap         # sync=incremental/bitmap: held busy while the job runs
        # QEMU 10.1's target-is-zero: the target reads as zeroes (the operator
        # says so), so its extents are not asked and zero ranges not written.
        self.target_is_zero = target_is_zero
        self._pivot = pivot
        self.created = None
        # copy-mode=write-blocking: client changes to the target, under the
        # copies' range lock, never waiting past THROUGH_TIMEOUT.
        self._through = through = WriteThrough(target, self.copy.ranges, granularity,
                                               clock=self.clock.now,
                                               stopped=lambda: self.cancelled)
        self.copy.blocked = through.blocks
        self.flushes.through = through
        self.link.on_loss.insert(1, through.drop)
        self._fatal = None
        self.set_progress(0, 0)

    # -- the durable record ---------------------------------------------------

    def settings(self):
        return {"target": self.target_address, "sync": self.sync,
                "granularity": self.granularity, "buf-size": self.buf_size,
                "on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "copy-mode": self.copy_mode,
                "region-size": self.intent.region_size if self.intent else None,
                "reconnect-delay": self.reconnect_delay, "created": self.created,
                "target-instance": self.trust.instance, "bitmap": self.bitmap_name,
                "target-is-zero": self.target_is_zero}

    def restore_state(self, paused, io_status, offset, total, ready_seen):
        super().restore_state(paused, io_status, offset, total, ready_seen)
        self.copy.copied = offset

    def attach(self):
        """Start tracking client changes (before start(), or first thing in run()).

        With clients quiesced, so that every change after this point passes
        the intent guard and the dirty-bitmap listener.  A restored job's
        dirty set is what its intent log holds.
        """
        if not self._start_listening():
            return
        if self._restored and self.intent is not None:
            for off, n, copied in self.intent.runs():
                self.trust.inherited_copied |= copied
                if copied and self.sync == "full":
                    self.compare.pending.append((off, n))
                else:
                    self.bitmap.mark(off, n)
            log.info("Mirror resumes job=%s dirty=%d to_verify=%d of %d bytes", self.id,
                     self.bitmap.dirty_bytes(), sum(n for _, n in self.compare.pending),
                     self.disk.size)

    def _may_defer_sets(self):
        """A background mirror sends the disk's bytes only through the copy pipeline."""
        return self.copy_mode == "background"

    # -- policies (block-job-change) ---------------------------------------

    def change(self, copy_mode=None, on_source_error=None, on_target_error=None):
        if copy_mode is not None:
            if self.copy_mode == "write-blocking" and copy_mode == "background":
                raise CommandError("Cannot change copy-mode from 'write-blocking' to 'background'")
            self.copy_mode = copy_mode
            if copy_mode == "write-blocking":
                self._stop_deferring()
        if on_source_error is not None:
            self.on_source_error = on_source_error
        if on_target_error is not None:
            self.on_target_error = on_target_error
        log.info("Mirror changed job=%s copy_mode=%s on_source_error=%s on_target_error=%s",
                 self.id, self.copy_mode, self.on_source_error, self.on_target_error)

    def policies(self):
        return {"on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "copy-mode": self.copy_mode}

    def type_info(self):
        """QEMU's actively-synced: write-blocking keeps the target in sync now (READY,
        no write-through failed, no change fell back to the background copy and
        waits in the bitmap)."""
        copy = self.copy
        synced = (self.copy_mode == "write-blocking" and self.is_ready and self._fatal is None
                  and copy.bitmap.is_clean() and not copy.zero_queue and not copy.retries)
        return {"actively-synced": synced}

    # -- client writes -------------------------------------------------------

    def _on_change(self, kind, offset, length, buf):
        """Disk listener: runs in the client's thread after its change completed."""
        if (kind != "failed" and self.copy_mode == "write-blocking" and self._fatal is None
                and not self.user_paused and not self.cancelled):
            try:
                if self.intent is not None:
                    self.intent.sync_owed()   # a set deferred before the change of mode
                through = self._through.apply(kind, offset, length, buf)
            except OSError as e:
                log.warning("Mirror write-through failed job=%s offset=%d length=%d error=%s",
                            self.id, offset, length, e)
                self.bitmap.mark(offset, length)
                self._through.drop()
                self._client_side_error(e)
                self.kick()
                return
            if not through:
                # The target did not answer in time: the background copy takes it.
                self.bitmap.mark(offset, length)
                self.kick()
                return
            # Marked after the write completed: a flush that starts later covers it.
            self.flushes.note_copied(offset, length)
            return
        super()._on_change(kind, offset, length, buf)

    def _first_dirty(self):
        if self.bitmap_name is not None:
            self._mark_from_bitmap()
        else:
            self.copy.mark_initial(self.sync, lambda: self.target_is_zero
                                   or self.link.reads_zero(self.disk.size))

    def _each_turn(self):
        if self._fatal is not None:
            raise self._fatal
        self._through.reap()

    def _client_side_error(self, exc):
        action = self.report_io_error("write", errno_of(exc), self.on_target_error)
        if action == "report" and self._fatal is None:
            self._fatal = exc

    # -- the job thread -------------------------------------------------------

    # -- completion --------------------------------------------------------

    def prepare(self):
        """Final sync with no client request running; pivot on complete.

        Any error here fails the job (no pivot), with BLOCK_JOB_ERROR action
        report whatever the policy: the disk is quiesced, so pausing or
        retrying would hold the clients' I/O.  So does a target that does
        not let it finish within FINAL_SYNC_TIMEOUT + reconnect-delay.
        """
        copy = self.copy
        if self._leave_asked is None:
            self._leave_asked = self.clock.now()
        self._drain_or_fail()
        with self.disk.quiesce():
            # No client change runs now; the guard and listener stay until the
            # pivot, so a shutdown that interrupts this keeps the record right.
            self._final_sync(before_flush=self._through.reap)
            if self.should_complete and self._pivot is not None:
                # The commit point: meta.json names the target (Service.pivot_to).
                # The job record is removed after this, as the job concludes: a
                # crash in between finds the pivot done and drops the record.
                # The job's connection is handed over: a server that takes one
                # client (qemu-nbd's default --shared=1) accepts no other.
                self._through.drop()
                self._pivot(self.target_address, self.target.detach(), self.reconnect_delay)
            self._stop_listening()
        log.info("Mirror finished job=%s pivot=%s copied=%d", self.id, self.should_complete,
                 copy.copied)

    # -- a delta move (sync=incremental/bitmap) ------------------------------------

    def hold_bitmap(self):
        """Take the bitmap busy (before the job starts; again after a restart)."""
        bitmaps = getattr(self.disk, "bitmaps", None)
        if self.bitmap_name is None or bitmaps is None:
            return
        try:
            bitmaps.set_busy(self.bitmap_name)
        except CommandError as e:
            if not self._restored:
                raise
            log.warning("Mirror bitmap not held job=%s bitmap=%s: %s", self.id,
                        self.bitmap_name, e)

    def _mark_from_bitmap(self):
        """The first dirty set: the bitmap's ranges.  Read after attach(), so a write
        after this is the listener's; one before it is in the bitmap (recording)."""
        runs, _ = self.disk.bitmaps.lookup(self.bitmap_name).bits.runs()
        for off, n in runs:
            self.bitmap.mark(off, n)
        log.info("Mirror copies a bitmap's ranges job=%s bitmap=%s bytes=%d", self.id,
                 self.bitmap_name, sum(n for _, n in runs))

    def _release_bitmap(self):
        bitmaps = getattr(self.disk, "bitmaps", None)
        if self.bitmap_name is None or bitmaps is None:
            return
        try:
            if bitmaps.lookup(self.bitmap_name).busy:
                bitmaps.set_busy(self.bitmap_name, False)
        except CommandError:
            pass

    def clean(self):
        self._release_bitmap()
        self._stop_listening()
        self.link.close()
        self._through.drop()
