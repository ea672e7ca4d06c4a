"""Target flushes and checkpoints: what makes a copy durable, and what a crash costs.

A copy the target answered is not yet safe: the target may lose it until a
flush covers it (its crash, a lost connection).  The flush pipeline keeps
the copies answered since the last flush (`unflushed`, at chunk
granularity), hands them to each flush it starts (:class:`Flush`.covered),
and copies them again (the pipeline's bitmap) when the flush fails or the
connection is lost before it completes.  Flushes are asynchronous like the
copies (the job thread only ever waits through target.wait(), so a stalled
target never blocks a cancel) and are processed in the order they started:
a later one may complete first, but nothing is settled before every earlier
flush succeeded.

With an intent log (intent.py) every flush is also a checkpoint: before it
starts, the source is flushed and the log's regions the job holds nothing
of become candidates; once the flush succeeded they are cleared, so a job
killed half way copies about the other half again.  While copying, a
checkpoint begins every CHECKPOINT_INTERVAL or every 1/CHECKPOINT_FRACTION
of the disk copied (one at a time: see checkpoint_due), and every
1/MARK_FRACTION of the disk the regions the answered copies reached are
marked COPIED (compared, or trusted, after a crash instead of copied).

The job adds its own bookkeeping after each good flush through `after`
(the mirror: READY, vouching for the target, saving its record).
"""

import collections
import logging
import threading

from ..core.bitmap import DirtyBitmap
from ..core.errors import errno_name, errno_of
from .cadence import Cadence
from .pipeline import Failure

log = logging.getLogger(__name__)

MiB = 1 << 20
# While copying, checkpoint (source flush, target flush, clear the intent log)
# this often, or after CHECKPOINT_FRACTION of the disk was copied.
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_FRACTION = 32
CHECKPOINT_MIN_BYTES = 1 * MiB
MAX_CHECKPOINTS = 1           # checkpoint flushes in flight at once (see checkpoint_due)
# Mark the regions whose copies were answered COPIED in the intent log (no
# sync) after every 1/MARK_FRACTION of the disk copied (at least MARK_MIN_BYTES).
MARK_FRACTION = 128
MARK_MIN_BYTES = 4 * MiB


class Flush:
    """A target flush in flight: `covered` holds the copies it makes durable."""

    __slots__ = ("covered", "leaving", "to_ready", "candidates", "result", "payload")

    def __init__(self, leaving, to_ready):
        self.covered = None
        self.leaving = leaving
        self.to_ready = to_ready
        self.candidates = ()          # an intent Checkpoint to clear when it succeeds
        self.result = None            # errno when it completed (0: success)
        self.payload = None           # the job's own record of what it covers


class FlushPipeline:
    def __init__(self, pipeline, intent, through=None):
        """pipeline: the CopyPipeline whose copies the flushes cover; intent: the
        job's IntentLog or None; through: the write-through part, whose own
        connection a flush must cover too when the target has no multi-conn."""
        self.pipeline = pipeline
        pipeline.on_flush = self._completed
        pipeline.on_copied = self.note_copied
        self.intent = intent
        self.through = through
        size = pipeline.size
        self._size, self._chunk = size, pipeline.chunk
        self.queue = collections.deque()  # Flush in flight or not processed, in order
        self.unflushed = DirtyBitmap(size, pipeline.chunk)
        self._lock = threading.Lock()     # unflushed: the job and client threads mark it
        self.last_flush = 0.0
        self.copied_since_flush = False
        self.exit_flushed = False         # a flush succeeded after complete/cancel was asked
        self.after = lambda flush: None   # the job's bookkeeping after a good flush
        self.on_start = lambda flush: None   # ... when a flush starts (flush.payload)
        self.also_held = lambda: ()       # ranges held elsewhere (a comparison in progress)
        self._checkpoints = Cadence(size, pipeline.clock, CHECKPOINT_INTERVAL,
                                    CHECKPOINT_FRACTION, CHECKPOINT_MIN_BYTES)
        self._mark_bytes = max(MARK_MIN_BYTES, size // MARK_FRACTION)
        self._copied_at_mark = 0

    def note_copied(self, offset, length):
        """The target answered a copy (or a write-through): the next flush covers it."""
        self.copied_since_flush = True
        with self._lock:
            self.unflushed.mark(offset, length)

    def _fresh(self):
        return DirtyBitmap(self._size, self._chunk)

    # -- flushes ---------------------------------------------------------------

    def start(self, leaving, to_ready, final=False):
        """Flush the target asynchronously; it covers every copy completed so far.

        leaving: complete/cancel was asked; to_ready: the copy had converged
        (the job's `after` makes it READY); final: the flush of prepare(),
        which is no checkpoint.
        """
        flush = Flush(leaving and not final, to_ready and not final)
        if self.intent is not None and not final:
            flush.candidates = self._checkpoint_begin()
            self._checkpoints.mark(self.pipeline.copied)
        with self._lock:
            flush.covered, self.unflushed = self.unflushed, self._fresh()
        self.on_start(flush)
        self.copied_since_flush = False
        if self.through is not None and not self.pipeline.target.multi_conn:
            # Write-throughs went over another connection that this flush
            # does not cover (synchronous, bounded by THROUGH_TIMEOUT).
            try:
                flushed = self.through.flush()
            except OSError as e:
                self._done(flush, errno_of(e))
                return
            if not flushed:
                # The target did not answer: copy it all again later, no error.
                self.pipeline.copy_again(flush.covered)
                return
        self.queue.append(flush)
        self.pipeline.target.submit_flush(flush)

    def _completed(self, flush, err):
        flush.result = err or 0
        self._process()

    def _process(self):
        """Handle the completed flushes at the head of the queue, in the order they
        started (a later one may complete first); one intent log write for all."""
        checkpoints = []
        while self.queue and self.queue[0].result is not None:
            flush = self.queue.popleft()
            self._done(flush, flush.result, checkpoints)
        if checkpoints:
            cleared = self.intent.finish_checkpoints(checkpoints, self.busy_regions(True))
            log.debug("%s checkpoint job=%s cleared=%d regions", self.pipeline.kind,
                      self.pipeline.job_id, cleared)

    def _done(self, flush, err, checkpoints=None):
        """A flush completed (every flush started before it was processed).  After a
        failed one nothing written since the last good flush can be trusted (the
        target may have dropped it): copy it again, and clear nothing for the
        flushes still in flight."""
        p = self.pipeline
        if err:
            log.warning("%s target flush failed job=%s errno=%s", p.kind, p.job_id,
                        errno_name(err))
            p.copy_again(flush.covered)
            # Copies since it started are no safer (a failed fsync may drop later
            # writes too): nothing since the last good flush is trusted.
            for later in self.queue:
                if later.covered is not None:
                    p.copy_again(later.covered)
                    later.covered = self._fresh()
                later.candidates = ()
            self.copy_unflushed_again()
            p.failures.append(Failure("write", err, 0, 0, "flush of %s" % p.target_name))
            return
        self.last_flush = p.clock()
        if flush.candidates:
            checkpoints.append(flush.candidates)
        if flush.leaving:
            self.exit_flushed = True
        self.after(flush)

    def target_lost(self):
        """The target connection was lost: what it acknowledged since the last
        flush may be lost, copy it again."""
        for flush in self.queue:
            if flush.covered is not None:
                self.pipeline.copy_again(flush.covered)
                flush.covered = self._fresh()
        self.copy_unflushed_again()

    def copy_unflushed_again(self):
        with self._lock:
            lost, self.unflushed = self.unflushed, self._fresh()
        self.pipeline.copy_again(lost)

    def move_to_unflushed(self, ranges):
        """Ranges the target holds but no flush covers yet (a trusted target's
        copies from before a crash): the next flush makes them durable."""
        with self._lock:
            for off, n in ranges:
                self.unflushed.mark(off, n)
        self.copied_since_flush = True

    # -- checkpoints -------------------------------------------------------------

    def checkpoint_due(self, is_ready):
        """While copying: time to make progress durable (a flush that clears the log)?

        One checkpoint flush at a time (MAX_CHECKPOINTS): overlapping ones cut the
        lag of the log behind the copy, but each target flush costs the target a
        device flush, and eight in flight made a 1 GiB mirror 55% slower here.
        The COPIED marks make the lag cheap instead (after a crash: only flushed
        where the same target instance holds them, else compared; not copied)."""
        if self.intent is None or len(self.queue) >= MAX_CHECKPOINTS or is_ready:
            return False
        p = self.pipeline
        return p.retries.gate_open() and self._checkpoints.due(p.copied)

    def _checkpoint_begin(self):
        """Before a target flush: the intent regions it may let us clear.

        The source is flushed first (data.img, then the cluster map), so the
        disk keeps, after any crash, the bytes those regions' copies read.
        """
        since = self.intent.change_mark()
        busy = self.busy_regions(unflushed=False)
        candidates = self.intent.begin_checkpoint(busy)
        if candidates:
            self.intent.mark_copied(busy, since=since)   # until this flush clears them
            try:
                self.pipeline.store.flush()
            except OSError as e:
                log.warning("%s checkpoint: source flush failed job=%s error=%s",
                            self.pipeline.kind, self.pipeline.job_id, e)
                return ()
        return candidates

    def busy_regions(self, unflushed, first=0, end=None):
        """Intent regions the job holds something of (bytearray, 1 = busy);
        with first/end, exact only for the regions [first, end)."""
        intent = self.intent
        busy = bytearray(intent.nregions)
        shift = intent.region_size.bit_length() - 1
        self.pipeline.bitmap.mark_regions(busy, shift, first, end)
        if unflushed:
            with self._lock:
                self.unflushed.mark_regions(busy, shift)
            for flush in self.queue:          # later flushes, still in flight
                if flush.covered is not None:
                    flush.covered.mark_regions(busy, shift)
        ranges = self.pipeline.held_ranges()
        ranges += self.also_held()
        for off, n in ranges:
            lo, hi = off >> shift, ((off + max(n, 1) - 1) >> shift) + 1
            busy[lo:hi] = b"\x01" * (hi - lo)
        return busy

    def mark_copied_due(self):
        """Mark COPIED when another 1/MARK_FRACTION of the disk was copied."""
        if self.intent is not None and (self.pipeline.copied - self._copied_at_mark
                                        >= self._mark_bytes):
            self._mark_copied()

    def _mark_copied(self):
        """Mark COPIED the set regions that the copies answered since the last
        mark reached and that the job holds nothing of any more."""
        p = self.pipeline
        self._copied_at_mark = p.copied
        lo, hi = p.mark_window
        p.mark_window = [p.size, 0]
        if lo < hi:
            shift = self.intent.region_size.bit_length() - 1
            first, end = lo >> shift, ((hi - 1) >> shift) + 1
            since = self.intent.change_mark()
            self.intent.mark_copied(self.busy_regions(False, first, end), first, end, since)
