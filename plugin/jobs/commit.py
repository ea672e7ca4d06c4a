"""The commit job (block-commit): write the overlay back into its base while clients write.

As QEMU's active commit (block/mirror.c in commit mode), the job is a mirror
whose target is the disk's own base: the base (a file, NBD export or RBD
image) is opened for writing through the copy machinery (plugin/blockcopy/),
the first dirty set is what the overlay holds (CopyPipeline.mark_initial
"top"), client changes are tracked by a disk listener and, durably, by the
write-intent log as a Disk guard; READY once in sync (BLOCK_JOB_READY, type
"commit").

Why the disk reads right while its base changes under it: the job writes
only ranges the overlay holds (DATA or ZERO clusters, which shadow the
base), or ranges that read from the base already (the same bytes back), so
no read of the disk sees a base range the job changed.  Cancel (before or
after READY) therefore leaves the overlay whole over a partly written base.

complete (prepare(), with clients quiesced): copy what is left, flush the
base, then in this order:

1. the job record says "completing";
2. the old base connection is replaced by a fresh one (after the job's own
   closed), and meta.json records the base's new fingerprint (base_check);
3. OverlayStore.empty(): the cluster map's switch to all-ABSENT is the
   commit point (plugin/disk/clustermap.py clear());
4. the record and the intent log are removed, still quiesced.

A crash before 3 finds the overlay whole over a base that holds the same
bytes, and the job comes back; after 3 the record (completing, overlay
empty) is dropped at start-up (factory.py).  The disk then goes on over its
base: reads fall through to it, new writes land in the overlay again.

While the job exists the base's fingerprint in meta.json is its size only
(OverlayStore.loosen_base_check), since the job changes the sampled bytes;
whatever way the job ends, the full fingerprint is recorded again (clean()).

Errors: on-error is the policy for both reads (the disk) and writes (the
base), as QEMU's; where a failure meets it is CopyJob's.
"""

import bisect
import logging

from .syncjob import SyncedCopyJob

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_BUF_SIZE = 16 * MiB
MAX_CHUNK = 1 * MiB


class CommitJob(SyncedCopyJob):
    changeable_options = frozenset({"on_error"})

    def __init__(self, job_id, bus, disk, base, speed=0, on_error="report",
                 auto_finalize=True, auto_dismiss=True, open_base=None, buf_size=None,
                 clock=None, reconnect_delay=0.0, intent=None, restored=False,
                 target_instance=None):
        """base: the base's address (the copy target); open_base(address): a new
        read-only backend of it (the disk's reads after complete)."""
        granularity = disk.store.cluster_size
        chunk = max(granularity, MAX_CHUNK)
        buf_size = buf_size or DEFAULT_BUF_SIZE
        super().__init__(job_id, "commit", bus, disk, base, granularity, chunk, buf_size,
                         speed, auto_finalize, auto_dismiss, clock, reconnect_delay, intent,
                         restored, target_instance, kind="Commit")
        self.granularity, self.buf_size = granularity, buf_size
        self.on_error = on_error
        self._open_base = open_base
        self.created = None
        self.completing = False        # saved before the overlay is emptied
        self.base_loosened = False     # meta.json keeps only the base's size
        self._emptied = False
        self.set_progress(0, 0)

    # -- the durable record ---------------------------------------------------

    def settings(self):
        return {"target": self.target_address, "granularity": self.granularity,
                "buf-size": self.buf_size, "on-error": self.on_error,
                "region-size": self.intent.region_size if self.intent else None,
                "reconnect-delay": self.reconnect_delay, "created": self.created,
                "target-instance": self.trust.instance, "completing": self.completing}

    def restore_state(self, paused, io_status, offset, total, ready_seen):
        super().restore_state(paused, io_status, offset, total, ready_seen)
        self.copy.copied = offset

    def loosen_base_check(self):
        """Before the job may write the base (launch, restore): meta.json keeps
        only the base's size.  Raises OSError."""
        self.disk.store.loosen_base_check()
        self.base_loosened = True

    def attach(self):
        """Start tracking client changes (before start()), clients quiesced, as the
        mirror does.  A restored job's dirty set is what the overlay holds of
        its intent log's regions (the rest of a region reads from the base:
        nothing to commit there); its COPIED regions are compared first."""
        if not self._start_listening():
            return
        if self._restored and self.intent is not None:
            held = list(self.disk.store.overlay_runs())
            starts = [off for off, _ in held]
            for off, n, copied in self.intent.runs():
                self.trust.inherited_copied |= copied
                for run in _intersection(held, starts, off, n):
                    if copied:
                        self.compare.pending.append(run)
                    else:
                        self.bitmap.mark(*run)
            log.info("Commit resumes job=%s dirty=%d to_verify=%d of %d bytes", self.id,
                     self.bitmap.dirty_bytes(), sum(n for _, n in self.compare.pending),
                     self.disk.size)

    # -- policies (block-job-change) ---------------------------------------

    def policy_for(self, operation):
        return self.on_error

    def change(self, on_error=None):
        if on_error is not None:
            self.on_error = on_error
        log.info("Commit changed job=%s on_error=%s", self.id, self.on_error)

    def policies(self):
        return {"on-error": self.on_error}

    # -- client writes -------------------------------------------------------

    def _first_dirty(self):
        self.copy.mark_initial("top", lambda: False)
        log.info("Commit started job=%s base=%s dirty=%d", self.id, self.target_name,
                 self.bitmap.dirty_bytes())

    # -- completion --------------------------------------------------------

    def prepare(self):
        """Final sync with no client request running; on complete, empty the overlay.

        Any error fails the job with the overlay whole (BLOCK_JOB_ERROR action
        report whatever the policy: the disk is quiesced), as the mirror's.
        """
        if self._leave_asked is None:
            self._leave_asked = self.clock.now()
        self._drain_or_fail()
        with self.disk.quiesce():
            self._final_sync()
            if self.should_complete:
                self._empty_overlay()
            self._stop_listening()
        log.info("Commit finished job=%s emptied=%s copied=%d", self.id, self._emptied,
                 self.copy.copied)

    def _empty_overlay(self):
        """Steps 1-4 of the module docstring; the base holds the disk, flushed."""
        store = self.disk.store
        self.completing = True
        self._save()
        self._close_link()
        base = self._open_base(self.target_address)
        try:
            store.record_base()
        except BaseException:
            base.close()
            raise
        store.empty(base)
        self._emptied = True
        # The commit point is behind us: the record goes while clients still
        # wait, so a record found at start-up with an empty overlay is one
        # whose complete had done its work.
        self._stop_listening()
        durable, self.durable = self.durable, None
        if durable is not None:
            try:
                durable.forget(self)
            except OSError as e:      # the commit is done: a record left is dropped at start
                log.error("Job record not removed job=%s error=%s", self.id, e)

    def _close_link(self):
        self.link.close()
        self.link.target = None

    def clean(self):
        self._stop_listening()
        self._close_link()
        if self.base_loosened and not self._emptied:
            # Cancelled, failed or soft-cancelled: nothing writes the base now.
            try:
                self.disk.store.record_base()
            except OSError as e:
                log.warning("Commit could not record the base's new fingerprint job=%s "
                            "error=%s: meta.json keeps its size only", self.id, e)


def _intersection(runs, starts, offset, length):
    """The parts of sorted, disjoint (offset, length) runs inside [offset, offset+length);
    starts: the runs' offsets (for bisect)."""
    stop = offset + length
    i = max(0, bisect.bisect_right(starts, offset) - 1)
    while i < len(runs) and runs[i][0] < stop:
        off, n = runs[i]
        lo, hi = max(off, offset), min(off + n, stop)
        if lo < hi:
            yield lo, hi - lo
        i += 1
