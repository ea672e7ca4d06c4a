"""The mirror job (drive-mirror): copy the served disk to a target while it is in use.

Phases, as QEMU's block/mirror.c:

1. Initial dirty set by sync mode: full (everything that does not read as
   zeros; zero ranges are zeroed on the target unless it reads as zeros
   already), top (what the overlay holds), none (nothing).  Client writes are
   tracked from the start by a dirty bitmap (a disk listener).
2. Copy loop: take a dirty run (at most `chunk` bytes), clear it, read the
   source, write or zero the target asynchronously, up to `buf-size` bytes in
   flight.  A write that lands after the read re-marks the run dirty.
3. Nothing dirty and nothing in flight: flush the target, READY.  Keep copying
   new writes (and flush about once a second while there are any).  Flushes
   are asynchronous like the copies: the job thread only ever waits on the
   target through wait(), so a stalled target never blocks a cancel.
4. complete (or a soft cancel): prepare() closes the disk's gate (no client
   request runs), copies what is left, flushes the target, and on complete
   pivots the disk to the target.

copy-mode=write-blocking: client writes are also written to the target
synchronously (a second connection), so the job converges under any write
load; a target that does not answer within THROUGH_TIMEOUT makes them fall
back to the background copy (writethrough.py).  Background copies and write-throughs of overlapping ranges exclude each
other with a range lock, so an older background copy never lands after a newer
write-through.

Errors (see docs/errors.md): a failed read of the source or write, zero or
flush of the target is recorded; the job then lets every request still in
flight finish, and applies the policy once per operation through
Job.report_io_error (the one decision point): report ends the job, ignore
hands the failed ranges to a RetrySchedule (plugin/jobs/backoff.py: per-range and
job-wide back-off), stop pauses the job (Job.report_io_error blocks until
resume or cancel) and retries the ranges at once.

The target connection (backends/target.py) connects in the background and
reconnects when it is lost: within reconnect-delay that is invisible here,
after it the requests fail and the policy applies; after a write error the
job waits (cancellably) for a new connection.  Whenever a connection is
lost, copies acknowledged on it since the last flush are copied again
(_target_lost), since a restarted server may have lost them.
Errors in the final copy of prepare() end the job (the disk is quiesced
then: pausing would hold every client), and so does a final copy, flush or
pivot that does not finish within FINAL_SYNC_TIMEOUT (+ reconnect-delay).

Durability (docs/jobs.md, docs/overlay.md): with an intent log
(plugin/jobs/intent.py) the job is a Disk guard, so every client change
records "this region may differ from the target" durably before it is
issued.  Every target flush is also a checkpoint: the regions the mirror
holds nothing of are cleared in the log once the source and then the target
flush have completed (IntentLog.begin_checkpoint/finish_checkpoints).  While
copying, a checkpoint begins every CHECKPOINT_INTERVAL or every
1/CHECKPOINT_FRACTION of the disk copied (once the one before completed:
see _checkpoint_due), so a mirror killed half way copies about the other
half again.  The code allows MAX_CHECKPOINTS in flight; flushes are
processed in the order they started: a checkpoint clears only after every
earlier flush succeeded.
A restored job (restored=True) starts from the log's regions instead of the
initial scan and connects to its target in run(), where a failure is an I/O
error for on-target-error, never a start-up failure.  Regions the log marks
COPIED (copies answered by the target, no flush yet: marked every
1/MARK_FRACTION of the disk copied) are first compared, target against disk,
and copied only where they differ (a helper thread: verify.py).

One module on purpose: the copy loop, its in-flight bookkeeping (_Op,
_Flush), the unflushed record and the failure handling share the job
thread's state and are only correct together; write-blocking lives apart
(writethrough.py) because it runs in client threads.
"""

import collections
import errno
import logging
import threading
import time

from ..backends import open_target
from ..backends.nbdconnect import CONNECT_TIMEOUT, redact
from ..backends.target import MAX_ZERO
from ..core.errors import CommandError, errno_name, errno_of, os_error
from ..disk.rangelock import RangeLock
from .backoff import RetrySchedule
from ..core.bitmap import DirtyBitmap
from .engine import Job
from .verify import Verifier
from .writethrough import WriteThrough

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_BUF_SIZE = 16 * MiB
MAX_CHUNK = 1 * MiB
# While ready, new writes are copied in batches at least this often.
READY_COPY_INTERVAL = 0.1
# While ready, flush the target this often (if something was copied), so that
# a lost target connection costs a re-copy of at most this much work.
READY_FLUSH_INTERVAL = 1.0
# complete / soft cancel: the final copy, flush and pivot must finish within
# this (plus reconnect-delay), or the job ends with an error.
FINAL_SYNC_TIMEOUT = 10.0
# While copying, checkpoint (source flush, target flush, clear the intent log)
# this often, or after CHECKPOINT_FRACTION of the disk was copied.
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_FRACTION = 32
CHECKPOINT_MIN_BYTES = 1 * MiB
MAX_CHECKPOINTS = 1           # checkpoint flushes in flight at once (see _checkpoint_due)
# Mark the regions whose copies were answered COPIED in the intent log (no
# sync) after every 1/MARK_FRACTION of the disk copied (at least MARK_MIN_BYTES).
MARK_FRACTION = 128
MARK_MIN_BYTES = 4 * MiB
# A checkpoint saves the job record (its progress) at most this often.
RECORD_PROGRESS_INTERVAL = 1.0
# At shutdown (SIGTERM) the job tries one last checkpoint for at most this long.
SHUTDOWN_CHECKPOINT_TIMEOUT = 2.0
CONNECT_BACKOFF_MAX = 5.0


class _Op:
    """One copy of [offset, offset+length) in flight, perhaps several target requests."""

    __slots__ = ("offset", "length", "token", "remaining", "error", "first", "end", "buf",
                 "data")

    def __init__(self, offset, length, token):
        self.offset, self.length, self.token = offset, length, token
        self.remaining = 0
        self.error = 0
        self.buf = None
        self.data = 0             # bytes written (not zeroed) by this copy


class _Flush:
    """A target flush in flight: `covered` holds the copies it makes durable."""

    __slots__ = ("covered", "leaving", "to_ready", "candidates", "result")

    def __init__(self, leaving, to_ready):
        self.covered = None
        self.leaving = leaving
        self.to_ready = to_ready
        self.candidates = ()          # an intent Checkpoint to clear when it succeeds
        self.result = None            # errno when it completed (0: success)


# One failed request: operation "read" (source) or "write" (target); a flush
# has length 0 (no range to copy again).
_Failure = collections.namedtuple("_Failure", "operation errno offset length detail")


def _describe(instance):
    """A target instance (target.instance()) for the log."""
    return " ".join("%s=%s" % (k, v) for k, v in sorted(instance.items()) if k != "boot")


class MirrorJob(Job):
    soft_cancel_when_ready = True
    changeable_options = frozenset({"copy_mode", "on_source_error", "on_target_error"})

    def __init__(self, job_id, bus, disk, target, sync="full", granularity=None,
                 buf_size=None, speed=0, on_source_error="report", on_target_error="report",
                 copy_mode="background", auto_finalize=True, auto_dismiss=True, pivot=None,
                 clock=None, reconnect_delay=0.0, intent=None, restored=False,
                 target_instance=None):
        super().__init__(job_id, "mirror", bus, device=disk.device, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, clock=clock)
        self.disk = disk
        self.target_address = target
        self.sync = sync
        self.granularity = granularity or disk.store.cluster_size
        self.chunk = max(self.granularity, MAX_CHUNK)
        self.max_in_flight = max(1, (buf_size or DEFAULT_BUF_SIZE) // self.chunk)
        self.on_source_error, self.on_target_error = on_source_error, on_target_error
        self.copy_mode = copy_mode
        self._pivot = pivot
        self.reconnect_delay = reconnect_delay
        self.target_name = redact(target)
        # Connects in the background: see open_target_within() and run().  A
        # restored job connects when it runs (after a pause it came back in,
        # not to a connection that failed while it was paused).
        self.target = None if restored else self._open_target()
        self._flushes = collections.deque()   # _Flush in flight or not processed, in order
        self._leave_asked = None      # when run() first saw complete / cancel
        self._last_answer = 0.0       # when the target last completed a request
        self.buf_size = buf_size or DEFAULT_BUF_SIZE
        self.intent = intent
        self._restored = restored
        self.created = None
        self._checkpoint_bytes = max(CHECKPOINT_MIN_BYTES, disk.size // CHECKPOINT_FRACTION)
        self._copied_at_checkpoint = 0
        self._last_checkpoint = self.clock.now()
        self._last_progress_save = self.clock.now()
        self._mark_bytes = max(MARK_MIN_BYTES, disk.size // MARK_FRACTION)
        self._copied_at_mark = 0
        self._mark_window = [disk.size, 0]    # bytes the copies answered since the last mark
        self._verify = collections.deque()    # (offset, length) to compare, restored COPIED
        # The target instance the record vouches for (see _vouch_target): its
        # COPIED regions need no comparison after a crash.
        self._instance = self._recorded_instance = target_instance
        self._vouch_at_ready = None           # vouched for once READY (after a comparison)
        self._inherited_copied = False        # the restored intent log had COPIED regions
        self._verifier = None                 # comparing them (verify.py)
        self.bitmap = DirtyBitmap(disk.size, self.granularity)
        # Copied but not yet flushed on the target: copied again if the
        # target connection is lost or a flush fails.
        self._unflushed = DirtyBitmap(disk.size, self.chunk)
        self._unflushed_lock = threading.Lock()
        self._last_flush = 0.0
        self._copied_since_flush = False
        self._exit_flushed = False    # a flush succeeded after complete/cancel was asked
        self._retries = RetrySchedule(self.chunk, clock=self.clock.now)
        self._failures = []           # _Failure records not yet handled
        self._ranges = RangeLock()
        self._through = WriteThrough(target, self._ranges, self.granularity, clock=self.clock.now)
        self._zero_queue = []         # (offset, length) to zero on the target first
        self._ops = set()             # copies in flight
        self._buffers = []            # free copy buffers of `chunk` bytes
        self._copied = 0
        self._written = 0             # bytes of data written to the target (x-copied-bytes)
        self._unpaid = 0              # bytes copied but not yet paid to the rate limiter
        self._in_flight_bytes = 0
        self._fatal = None
        self._listening = False
        self.set_progress(0, 0)

    # -- the target connection ------------------------------------------------

    def open_target_within(self, timeout):
        """Wait up to timeout for the target connection (the command's thread).

        True if connected and the sizes agree; False if still connecting
        (run() waits for it); raises OSError (cannot connect) or
        CommandError (different sizes).
        """
        if not self.target.wait_open(timeout):
            return False
        self._check_size()
        return True

    def _check_size(self):
        if self.target.size() != self.disk.size:
            raise CommandError("Source and target image have different sizes")

    def _open_target(self):
        target = open_target(self.target_address, self.reconnect_delay)
        target.on_loss = self._target_lost
        return target

    def _await_target(self):
        """run(): wait for the target connection; False if cancelled first.

        A target that cannot be reached (a restored job's target may be down)
        is a write error for on-target-error: report ends the job, stop pauses
        it (resume tries again), ignore tries again with a growing delay.
        """
        delay = 0.05
        while True:
            try:
                while not self.target.wait_open(0.1):
                    if self.pause_point():
                        return False
                self._check_size()
                return True
            except OSError as e:
                log.warning("Mirror target unreachable id=%s target=%s error=%s",
                            self.id, self.target_name, e)
                action = self.report_io_error("write", errno_of(e), self.on_target_error)
                if action == "report":
                    raise
                if self.cancelled or (action == "ignore" and self.sleep(delay)):
                    return False
                delay = min(CONNECT_BACKOFF_MAX, delay * 2)
                self.target.close()
                self.target = self._open_target()

    def _target_lost(self):
        """The target connection was lost (called inside the target's call that
        noticed it, before anything goes to a new connection): what it
        acknowledged since the last flush may be lost, copy it again."""
        self._unvouch()
        self._through.drop()
        for flush in self._flushes:
            if flush.covered is not None:
                self._copy_again(flush.covered)
                flush.covered = DirtyBitmap(self.disk.size, self.chunk)
        self._copy_unflushed_again()

    # -- the target instance ---------------------------------------------------

    def _target_instance(self):
        instance = getattr(self.target, "instance", None)
        try:
            return instance() if instance is not None else None
        except OSError:
            return None

    def _vouch_target(self):
        """Connected: does the record vouch for this target instance?

        target.instance() names what holds the writes the target answered:
        the same file in the same boot (the page cache), or the same NBD
        server process over a Unix socket, with multi-conn (a flush on a new
        connection covers the old one's writes); None where nothing can tell
        (TCP, RBD).  The COPIED regions a crash left (exact within a boot:
        intent.py) were answered by the instance the record names, so when
        it is this one they need no comparison: they are unflushed copies,
        made durable by the next flush, copied again if it fails.

        A fresh job vouches for its instance at once.  A restored one whose
        intent log has COPIED regions of another instance (or of an unknown
        one) vouches only once READY: by then every such region is compared
        or copied again, and flushed.  A lost connection takes it back
        (_unvouch), before anything goes to a new one.
        """
        current = self._target_instance()
        trusted = (self._restored and current is not None
                   and current == self._recorded_instance)
        if trusted and self._verify:
            ranges, self._verify = list(self._verify), collections.deque()
            with self._unflushed_lock:
                for off, n in ranges:
                    self._unflushed.mark(off, n)
            self._copied_since_flush = True
            log.info("Mirror trusts its copies id=%s bytes=%d: the same target instance (%s)",
                     self.id, sum(n for _, n in ranges), _describe(current))
        if not self._restored or trusted or not self._inherited_copied:
            if current != self._instance:
                self._instance = current
                self._save()
        else:
            self._vouch_at_ready = current
            if self._instance is not None:
                self._instance = None
                self._save()

    def _vouch_now_ready(self):
        """READY: every COPIED region of another instance has been compared (so this
        one holds it) or copied again; vouch for this instance.  True if the
        record changed."""
        if self._vouch_at_ready is None:
            return False
        if self._target_instance() == self._vouch_at_ready:
            self._instance = self._vouch_at_ready
        self._vouch_at_ready = None
        return self._instance is not None

    def _unvouch(self):
        self._vouch_at_ready = None
        if self._instance is not None:
            self._instance = None
            self._save()

    # -- the durable record ---------------------------------------------------

    def settings(self):
        return {"target": self.target_address, "sync": self.sync,
                "granularity": self.granularity, "buf-size": self.buf_size,
                "on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "copy-mode": self.copy_mode,
                "region-size": self.intent.region_size if self.intent else None,
                "reconnect-delay": self.reconnect_delay, "created": self.created,
                "target-instance": self._instance}

    def restore_state(self, paused, io_status, offset, total, ready_seen):
        super().restore_state(paused, io_status, offset, total, ready_seen)
        self._copied = offset

    def remove_files(self):
        if self.intent is not None:
            self.intent.remove()

    def attach(self):
        """Start tracking client changes (before start(), or first thing in run()).

        With clients quiesced, so that every change after this point passes
        the intent guard and the dirty-bitmap listener.  A restored job's
        dirty set is what its intent log holds.
        """
        if self._listening:
            return
        with self.disk.quiesce():
            if self.intent is not None:
                self.disk.add_guard(self.intent)
            self.disk.add_listener(self._on_change)
            self._listening = True
        if self._restored and self.intent is not None:
            for off, n, copied in self.intent.runs():
                self._inherited_copied |= copied
                if copied and self.sync == "full":
                    self._verify.append((off, n))
                else:
                    self.bitmap.mark(off, n)
            log.info("Mirror resumes id=%s dirty=%d to_verify=%d of %d bytes", self.id,
                     self.bitmap.dirty_bytes(), sum(n for _, n in self._verify),
                     self.disk.size)

    # -- policies (block-job-change) ---------------------------------------

    def change(self, copy_mode=None, on_source_error=None, on_target_error=None):
        if copy_mode is not None:
            if self.copy_mode == "write-blocking" and copy_mode == "background":
                raise CommandError("Cannot change copy-mode from 'write-blocking' to 'background'")
            self.copy_mode = copy_mode
        if on_source_error is not None:
            self.on_source_error = on_source_error
        if on_target_error is not None:
            self.on_target_error = on_target_error
        log.info("Mirror changed id=%s copy_mode=%s on_source_error=%s on_target_error=%s",
                 self.id, self.copy_mode, self.on_source_error, self.on_target_error)

    def policies(self):
        return {"on-source-error": self.on_source_error,
                "on-target-error": self.on_target_error, "copy-mode": self.copy_mode}

    def copied_bytes(self):
        return self._written

    # -- client writes -------------------------------------------------------

    def _on_change(self, kind, offset, length, buf):
        """Disk listener: runs in the client's thread after its change completed."""
        if self.copy_mode == "write-blocking" and self._fatal is None and not self.user_paused:
            try:
                through = self._through.apply(kind, offset, length, buf)
            except OSError as e:
                log.warning("Mirror write-through failed id=%s offset=%d length=%d error=%s",
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
            with self._unflushed_lock:
                self._unflushed.mark(offset, length)
            return
        # Before READY a clean-to-dirty change wakes the job at once; once ready
        # the job collects writes for up to READY_COPY_INTERVAL, so a busy
        # client does not wake it (and contend for the GIL) on every write.
        if self.bitmap.mark(offset, length) and not self.is_ready:
            self.kick()

    def _client_side_error(self, exc):
        action = self.report_io_error("write", errno_of(exc), self.on_target_error)
        if action == "report" and self._fatal is None:
            self._fatal = exc

    # -- the job thread -------------------------------------------------------

    def run(self):
        try:
            self._run()
        finally:
            self._stop_verify()
            if self.suspended:
                self._shutdown_checkpoint()

    def _shutdown_checkpoint(self):
        """Shutdown: let the copies in flight land and checkpoint once, so the
        restarted job copies little; given up after SHUTDOWN_CHECKPOINT_TIMEOUT
        (a stalled target), the intent log is right either way."""
        if self.target is None:
            return
        deadline = time.monotonic() + SHUTDOWN_CHECKPOINT_TIMEOUT
        try:
            while self.target.in_flight() and time.monotonic() < deadline:
                self._reap(self.target.wait(0.1))
            if self.target.in_flight() or self._failures or self.intent is None:
                return
            self._start_flush(to_ready=False)
            while self._flushes and time.monotonic() < deadline:
                self._reap(self.target.wait(0.1))
            log.info("Mirror shutdown checkpoint id=%s done=%s intent=%d bytes", self.id,
                     not self._flushes, self.intent.set_bytes())
        except Exception:
            log.exception("Mirror shutdown checkpoint failed id=%s", self.id)

    def _run(self):
        self.attach()
        if self.target is None:
            self.target = self._open_target()
        if not self._await_target():
            return
        self._vouch_target()
        if not self._restored:
            self._initial_dirty()
        pos = 0
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self.pause_point():
                return
            if self.should_complete or self.cancel_requested:
                if self._leave_asked is None:
                    self._leave_asked = self.clock.now()
                self._check_stall()
            if self._verify:
                self._start_verify()
            if self._verifier is not None:
                self._collect_verified()
            for off, n in self._retries.due():
                self.bitmap.mark(off, n)
            self._through.reap()
            self._update_progress()
            copied_before = self._copied
            pos = self._issue_some(pos)
            if self.intent is not None and self._copied - self._copied_at_mark >= self._mark_bytes:
                self._mark_copied()
            if self.cancelled:
                return
            if self.target.in_flight() and not self._failures:
                self._reap(self.target.wait(0.1))
            if self._failures:
                if self._handle_failures():
                    return
                continue
            if self._checkpoint_due():
                self._start_flush(to_ready=False)
            if self.target.in_flight():
                continue
            progressed = self._copied != copied_before
            now = self.clock.now()
            if self._zero_queue or not self.bitmap.is_clean():
                if self._retries.gate > now or not progressed:
                    # Nothing could start (the retry gate is closed): wait.
                    self.sleep(max(0.01, self._retries.gate - now))
                # Otherwise a rate-limited job copied its one range: go on at once.
                continue
            if self._verifier is not None:
                # Nothing else left to copy: copying what is not compared yet is
                # faster than waiting for the comparison, which never delays READY.
                log.info("Mirror stops comparing id=%s: copying the rest", self.id)
                self._stop_verify()
                continue
            if self._retries:
                self.sleep(max(0.01, self._retries.next_due() - now))
                continue
            if self._flush_due(now):
                if self._retries.gate_open():
                    self._start_flush()
                else:           # a flush failed a moment ago: not again at once
                    self.sleep(max(0.01, self._retries.gate - now))
                continue
            if not self.is_ready:
                if self._vouch_now_ready():
                    self._save()
                self._update_progress()
                self.transition_to_ready()
            if self.should_complete or self.cancel_requested:
                return
            if self._unflushed.is_clean():
                self.sleep(READY_COPY_INTERVAL)
            else:
                self.sleep(max(0.01, min(READY_COPY_INTERVAL,
                                         self._last_flush + READY_FLUSH_INTERVAL - now)))

    def _checkpoint_due(self):
        """While copying: time to make progress durable (a flush that clears the log)?

        One checkpoint flush at a time (MAX_CHECKPOINTS): overlapping ones cut the
        lag of the log behind the copy, but each target flush costs the target a
        device flush, and eight in flight made a 1 GiB mirror 55% slower here.
        The COPIED marks make the lag cheap instead (after a crash: only flushed
        where the same target instance holds them, else compared; not copied)."""
        if self.intent is None or len(self._flushes) >= MAX_CHECKPOINTS or self.is_ready:
            return False
        if not self._retries.gate_open():
            return False
        copied = self._copied - self._copied_at_checkpoint
        if copied <= 0:
            return False
        return (copied >= self._checkpoint_bytes
                or self.clock.now() - self._last_checkpoint >= CHECKPOINT_INTERVAL)

    def _busy_regions(self, unflushed, first=0, end=None):
        """Intent regions the mirror holds something of (bytearray, 1 = busy);
        with first/end, exact only for the regions [first, end)."""
        intent = self.intent
        busy = bytearray(intent.nregions)
        shift = intent.region_size.bit_length() - 1
        self.bitmap.mark_regions(busy, shift, first, end)
        if unflushed:
            with self._unflushed_lock:
                self._unflushed.mark_regions(busy, shift)
            for flush in self._flushes:       # later flushes, still in flight
                if flush.covered is not None:
                    flush.covered.mark_regions(busy, shift)
        ranges = [(o.offset, o.length) for o in self._ops]
        ranges += self._zero_queue
        if self._verifier is not None:
            ranges += self._verifier.ranges
        ranges += self._retries.ranges()
        ranges += [(f.offset, f.length) for f in self._failures if f.length]
        for off, n in ranges:
            first, end = off >> shift, ((off + max(n, 1) - 1) >> shift) + 1
            busy[first:end] = b"\x01" * (end - first)
        return busy

    def _mark_copied(self):
        """Mark COPIED the set regions that the copies answered since the last
        mark reached and that the mirror holds nothing of any more."""
        self._copied_at_mark = self._copied
        lo, hi = self._mark_window
        self._mark_window = [self.disk.size, 0]
        if lo < hi:
            shift = self.intent.region_size.bit_length() - 1
            first, end = lo >> shift, ((hi - 1) >> shift) + 1
            since = self.intent.change_mark()
            self.intent.mark_copied(self._busy_regions(False, first, end), first, end, since)

    def _start_verify(self):
        """Restored COPIED regions: compare them with the target in a helper thread
        (plugin/jobs/verify.py) while this thread copies the rest."""
        ranges, self._verify = list(self._verify), collections.deque()
        open_reader = getattr(self.target, "open_reader", None)
        reader = None
        if open_reader is not None:
            try:
                reader = open_reader()
            except OSError as e:
                log.warning("Mirror cannot compare id=%s error=%s: copying instead", self.id, e)
        if reader is None:
            for off, n in ranges:
                self.bitmap.mark(off, n)
            return
        self._verifier = Verifier(self.disk.store, reader, ranges, self.chunk, self.id,
                                  clock=self.clock.now)
        self._verifier.start()

    def _collect_verified(self):
        """Mark dirty what the comparison found different; log when it is done."""
        v = self._verifier
        done = v.done                 # read first: everything found before it is drained
        for off, n in v.take_different():
            self.bitmap.mark(off, n)
        if done:
            self._verifier = None
            log.info("Mirror verified id=%s equal=%d different=%d bytes seconds=%.3f",
                     self.id, v.equal_bytes, v.different_bytes, self.clock.now() - v.started_at)
        elif v.stalled(CONNECT_TIMEOUT):
            log.warning("Mirror verify stalled id=%s: copying the rest instead", self.id)
            v.stop()

    def _stop_verify(self):
        if self._verifier is not None:
            self._verifier.stop()
            self._collect_verified()

    def _checkpoint_begin(self):
        """Before a target flush: the intent regions it may let us clear.

        The source is flushed first (data.img, then the cluster map), so the
        disk keeps, after any crash, the bytes those regions' copies read.
        """
        since = self.intent.change_mark()
        busy = self._busy_regions(unflushed=False)
        candidates = self.intent.begin_checkpoint(busy)
        if candidates:
            self.intent.mark_copied(busy, since=since)   # until this flush clears them
            try:
                self.disk.store.flush()
            except OSError as e:
                log.warning("Mirror checkpoint: source flush failed id=%s error=%s", self.id, e)
                return ()
        return candidates

    def _flush_due(self, now):
        """Everything is copied: should the target be flushed now?

        Before READY: if anything was copied (READY follows the flush, see
        _flush_done).  Before leaving for prepare(): one good flush after
        complete/cancel was asked, which finds a target lost while idle.
        While ready: about once a second if anything (write-throughs too)
        was written since, to keep a re-copy after a reconnect small.
        """
        if not self.is_ready:
            return self._copied_since_flush
        if (self.should_complete or self.cancel_requested) and not self._exit_flushed:
            return True
        # A checkpoint also clears the intent log, so an idle mirror keeps
        # flushing until the log is clear (the regions clients wrote last
        # are cleared one interval after their last change).
        lagging = self.intent is not None and self.intent.set_bytes() > 0
        return ((lagging or not self._unflushed.is_clean())
                and now - self._last_flush >= READY_FLUSH_INTERVAL)

    def _initial_dirty(self):
        store = self.disk.store
        if self.sync == "none":
            return
        if self.sync == "top" and store.has_base:
            for off, length in store.overlay_runs():
                self.bitmap.mark(off, length)
            return
        target_zero = self._target_reads_zero()
        pos = 0
        while pos < self.disk.size:
            for e in store.extents(pos, self.disk.size - pos):
                if not e.zero:
                    self.bitmap.mark(e.offset, e.length)
                elif not target_zero:
                    self._zero_queue.append((e.offset, e.length))
                pos = e.end

    def _target_reads_zero(self):
        """True if the target is known to read as zeros (its zero ranges need no copy).

        A failed query only means "not known": the zeroing pass then runs and
        its errors go through the policy like any other write.
        """
        try:
            return all(e.zero for e in self.target.extents(0, self.disk.size))
        except OSError as e:
            log.warning("Mirror target extents failed id=%s error=%s", self.id, e)
            return False

    def _update_progress(self, pending=0):
        remaining = self.bitmap.dirty_bytes() + self._in_flight_bytes + pending
        if self._verifier is not None:
            remaining += self._verifier.remaining()
        remaining += sum(n for _, n in self._zero_queue) + self._retries.waiting_bytes
        self.set_progress(self._copied, self._copied + remaining)

    def _issue_some(self, pos, final=False):
        """Start copies until buf-size is in flight or nothing is dirty; returns the cursor.

        With a speed limit, one copy at a time: the target is only driven
        while the job thread polls it, so a copy must not sit unsent while
        the rate limiter sleeps.  The copy is paid for before the next one.
        final: the last copy of prepare(), with clients quiesced: no speed
        limit and no retry gate hold it back.
        """
        while self.target.in_flight() < self.max_in_flight and not self._failures:
            if not final and not self._retries.gate_open():
                break
            if self._zero_queue:
                off, length = self._zero_queue.pop()
                n = min(length, MAX_ZERO)
                if n < length:
                    self._zero_queue.append((off + n, length - n))
                if not self._start_op(off, n, zero=True):
                    break
                continue
            if not final and (self.speed or self._unpaid):
                if self.target.in_flight():
                    break
                unpaid, self._unpaid = self._unpaid, 0
                if unpaid and self.throttle(unpaid):
                    break
            run = self.bitmap.take(pos, self.chunk)
            if run is None:
                break
            off, n = run
            pos = off + n
            if not self._start_op(off, n):
                break
            if self.speed and not final:
                self._unpaid = n
                break
        return pos

    def _start_op(self, offset, length, zero=False):
        """Read the source and submit target requests for one range.

        False if nothing was started: a copy of the same granules is in
        flight, or the read failed (recorded in _failures).
        """
        g = self.granularity
        first, end = offset // g, (offset + length + g - 1) // g
        if (any(o.first < end and first < o.end for o in self._ops)
                or self._through.blocks(first, end)):
            # A copy of these granules is in flight: a second one could land
            # before it on the target.  Retry once it has completed.
            if zero:
                self._zero_queue.append((offset, length))
            else:
                self.bitmap.mark(offset, length)
            return False
        op = _Op(offset, length, self._ranges.acquire(first, end))
        op.first, op.end = first, end
        store = self.disk.store
        requests = []
        try:
            if zero:
                requests.append((offset, length, None))
            else:
                op.buf = self._take_buffer(length)
                view = memoryview(op.buf)
                pos, stop = offset, offset + length
                while pos < stop:
                    for e in store.extents(pos, stop - pos):
                        if e.zero:
                            requests.append((e.offset, e.length, None))
                        else:
                            piece = view[e.offset - offset:e.end - offset]
                            store.read(piece, e.offset)
                            requests.append((e.offset, e.length, piece))
                        pos = e.end
        except OSError as e:
            self._give_buffer(op)
            self._ranges.release(op.token)
            log.warning("Mirror read failed id=%s offset=%d length=%d error=%s",
                        self.id, offset, length, e)
            self._failures.append(_Failure("read", errno_of(e), offset, length, str(e)))
            return False
        op.remaining = len(requests)
        op.data = sum(n for _, n, buf in requests if buf is not None)
        if not requests:
            self._give_buffer(op)
            self._ranges.release(op.token)
            return True
        self._ops.add(op)
        self._in_flight_bytes += length
        for o, n, buf in requests:
            if buf is None:
                self.target.submit_zero(o, n, op)
            else:
                self.target.submit_write(buf, o, op)
        return True

    def _take_buffer(self, length):
        """A copy buffer from the pool: reused memory is already mapped and faulted in,
        which makes a 1 GiB copy several times cheaper than fresh bytearrays."""
        if length <= self.chunk and self._buffers:
            return self._buffers.pop()
        return bytearray(max(length, self.chunk))

    def _give_buffer(self, op):
        if op.buf is not None and len(op.buf) == self.chunk:
            self._buffers.append(op.buf)
        op.buf = None

    def _reap(self, completions):
        if completions:
            self._last_answer = self.clock.now()
        for op, err in completions:
            if isinstance(op, _Flush):
                op.result = err or 0
                self._process_flushes()
                continue
            if err and not op.error:
                op.error = err
            op.remaining -= 1
            if op.remaining:
                continue
            self._ranges.release(op.token)
            self._ops.discard(op)
            self._give_buffer(op)
            self._in_flight_bytes -= op.length
            if op.error:
                log.warning("Mirror write failed id=%s offset=%d length=%d errno=%s",
                            self.id, op.offset, op.length, errno_name(op.error))
                self._failures.append(_Failure("write", op.error, op.offset, op.length,
                                               "write to %s" % self.target_name))
            else:
                self._copied += op.length
                self._written += op.data
                window = self._mark_window
                if op.offset < window[0]:
                    window[0] = op.offset
                if op.offset + op.length > window[1]:
                    window[1] = op.offset + op.length
                self._copied_since_flush = True
                self._retries.succeeded(op.offset, op.length)
                with self._unflushed_lock:
                    self._unflushed.mark(op.offset, op.length)
        if completions:
            self._update_progress()

    def _drain(self):
        """Wait for every request in flight; False if cancelled first."""
        while self.target.in_flight():
            if self.cancelled:
                return False
            self._reap(self.target.wait(0.1))
        return True

    def _handle_failures(self):
        """Apply the policies to the recorded failures; True if the job was cancelled.

        Requests in flight finish first, so that one incident (a target
        going away fails every request at once) is decided once per
        operation, and a stop pauses a job with nothing in flight.
        """
        if not self._drain():
            return True
        failures, self._failures = self._failures, []
        for operation in ("read", "write"):
            group = [f for f in failures if f.operation == operation]
            if not group:
                continue
            err = group[0].errno
            policy = self.on_source_error if operation == "read" else self.on_target_error
            ranges = [(f.offset, f.length) for f in group if f.length]
            self._update_progress(pending=sum(n for _, n in ranges))
            action = self.report_io_error(operation, err, policy)
            if self.cancelled:
                return True
            if action == "report":
                raise os_error(err, group[0].detail)
            if operation == "write":
                self._recover_target()
            if action == "ignore":
                for off, n in ranges:
                    self._retries.defer(off, n)
                self._retries.failed_batch()
            else:
                # stop: report_io_error returned on resume; retry at once.
                for off, n in ranges:
                    self.bitmap.mark(off, n)
        return False

    def _recover_target(self):
        """After a write error: wait (cancellably, at most CONNECT_TIMEOUT) for a
        working target connection; _target_lost() did the bookkeeping."""
        deadline = self.clock.now() + CONNECT_TIMEOUT
        while not self.target.reconnect(0.1):
            if self.cancelled or self.clock.now() > deadline:
                log.warning("Mirror target not reconnected id=%s target=%s", self.id,
                            self.target_name)
                return

    def _copy_unflushed_again(self):
        with self._unflushed_lock:
            lost, self._unflushed = self._unflushed, DirtyBitmap(self.disk.size, self.chunk)
        self._copy_again(lost)

    def _copy_again(self, lost):
        """Mark every range of the bitmap `lost` dirty again (its copies may be lost)."""
        count = 0
        run = lost.take(0, self.disk.size)
        while run is not None:
            self.bitmap.mark(*run)
            count += run[1]
            run = lost.take(0, self.disk.size)
        if count:
            self._copied -= min(self._copied, count)
            log.info("Mirror copies again what the target may have lost id=%s bytes=%d",
                     self.id, count)

    def _start_flush(self, final=False, to_ready=True):
        """Flush the target asynchronously; it covers every copy completed so far.

        final: the flush of prepare() (the job state machine is past READY).
        to_ready: the copy had converged (READY follows this flush);
        False for a checkpoint while copying.
        """
        leaving = self.should_complete or self.cancel_requested
        flush = _Flush(leaving and not final, to_ready and not final and not self.is_ready)
        if self.intent is not None and not final:
            flush.candidates = self._checkpoint_begin()
            self._copied_at_checkpoint = self._copied
            self._last_checkpoint = self.clock.now()
        with self._unflushed_lock:
            flush.covered, self._unflushed = self._unflushed, DirtyBitmap(self.disk.size,
                                                                          self.chunk)
        self._copied_since_flush = False
        if not self.target.multi_conn:
            # Write-throughs went over another connection that this flush
            # does not cover (synchronous, bounded by THROUGH_TIMEOUT).
            try:
                flushed = self._through.flush()
            except OSError as e:
                self._flush_done(flush, errno_of(e))
                return
            if not flushed:
                # The target did not answer: copy it all again later, no error.
                self._copy_again(flush.covered)
                return
        self._flushes.append(flush)
        self.target.submit_flush(flush)

    def _process_flushes(self):
        """Handle the completed flushes at the head of the queue, in the order they
        started (a later one may complete first); one intent log write for all."""
        checkpoints = []
        while self._flushes and self._flushes[0].result is not None:
            flush = self._flushes.popleft()
            self._flush_done(flush, flush.result, checkpoints)
        if checkpoints:
            cleared = self.intent.finish_checkpoints(checkpoints,
                                                     self._busy_regions(unflushed=True))
            log.debug("Mirror checkpoint id=%s cleared=%d regions", self.id, cleared)

    def _flush_done(self, flush, err, checkpoints=None):
        """A flush completed (every flush started before it was processed).  After a
        failed one nothing written since the last good flush can be trusted (the
        target may have dropped it): copy it again, and clear nothing for the
        flushes still in flight."""
        if err:
            log.warning("Mirror target flush failed id=%s errno=%s", self.id, errno_name(err))
            self._copy_again(flush.covered)
            # Copies since it started are no safer (a failed fsync may drop later
            # writes too): nothing since the last good flush is trusted.
            for later in self._flushes:
                if later.covered is not None:
                    self._copy_again(later.covered)
                    later.covered = DirtyBitmap(self.disk.size, self.chunk)
                later.candidates = ()
            self._copy_unflushed_again()
            self._failures.append(_Failure("write", err, 0, 0,
                                           "flush of %s" % self.target_name))
            return
        self._last_flush = self.clock.now()
        if flush.candidates:
            checkpoints.append(flush.candidates)
        if flush.to_ready:
            self._vouch_now_ready()
        if self.intent is not None:
            self._update_progress()
            now = self.clock.now()
            if (flush.to_ready or flush.leaving
                    or now - self._last_progress_save >= RECORD_PROGRESS_INTERVAL):
                self._last_progress_save = now
                self._save()
        if flush.leaving:
            self._exit_flushed = True
        if flush.to_ready and not self.is_ready:
            # The copy had converged when this flush started: in sync now,
            # even if clients have written since (QEMU does the same).
            self._update_progress()
            self.transition_to_ready()

    # -- completion --------------------------------------------------------

    def prepare(self):
        """Final sync with no client request running; pivot on complete.

        Any error here fails the job (no pivot), with BLOCK_JOB_ERROR action
        report whatever the policy: the disk is quiesced, so pausing or
        retrying would hold the clients' I/O.  So does a target that does
        not let it finish within FINAL_SYNC_TIMEOUT + reconnect-delay.
        """
        if self._leave_asked is None:
            self._leave_asked = self.clock.now()
        self._drain_or_fail()
        with self.disk.quiesce():
            # No client change runs now; the guard and listener stay until the
            # pivot, so a shutdown that interrupts this keeps the record right.
            for off, n in self._retries.drain():
                self.bitmap.mark(off, n)
            pos = 0
            while True:
                while self._zero_queue or not self.bitmap.is_clean() or self.target.in_flight():
                    self._check_suspended()
                    self._check_stall()
                    self._through.reap()
                    pos = self._issue_some(pos, final=True)
                    self._raise_failures()
                    self._reap(self.target.wait(0.1))
                    self._raise_failures()
                self._update_progress()
                self._start_flush(final=True)
                self._drain_or_fail()
                # Clean unless the write-through's flush went unanswered (its
                # ranges are dirty again) or the connection was lost meanwhile.
                if not self._zero_queue and self.bitmap.is_clean():
                    break
            if self.should_complete and self._pivot is not None:
                # The commit point: meta.json names the target (Service.pivot_to).
                # The job record is removed after this, as the job concludes: a
                # crash in between finds the pivot done and drops the record.
                # The job's connection is handed over: a server that takes one
                # client (qemu-nbd's default --shared=1) accepts no other.
                self._through.drop()
                self._pivot(self.target_address, self.target.detach(), self.reconnect_delay)
            self._stop_listening()
        log.info("Mirror finished id=%s pivot=%s copied=%d", self.id, self.should_complete,
                 self._copied)

    def _drain_or_fail(self):
        while self.target.in_flight():
            self._check_suspended()
            self._check_stall()
            self._reap(self.target.wait(0.1))
        self._raise_failures()

    def _check_stall(self):
        """Once complete or cancel was asked: a target that answers nothing for
        FINAL_SYNC_TIMEOUT + reconnect-delay ends the job (BLOCK_JOB_ERROR
        action report, then the job fails), so that complete ends in bounded
        time.  A target that is slow but answering is waited for."""
        bound = FINAL_SYNC_TIMEOUT + self.reconnect_delay
        if self.clock.now() - max(self._leave_asked, self._last_answer) > bound:
            self._failures.insert(0, _Failure(
                "write", errno.ETIMEDOUT, 0, 0,
                "%s answered nothing for %gs while the job was finishing"
                % (self.target_name, bound)))
            self._raise_failures()

    def _check_suspended(self):
        if self.suspended:
            raise OSError(errno.ECANCELED, "the server is shutting down")

    def _raise_failures(self):
        """In prepare(): any failure ends the job, whatever the policy says."""
        if self._failures:
            failure = self._failures[0]
            self._failures = []
            # Still one BLOCK_JOB_ERROR per error: its action is what happens.
            self.report_io_error(failure.operation, failure.errno, "report")
            raise os_error(failure.errno, failure.detail)

    def _stop_listening(self):
        if self._listening:
            self.disk.remove_listener(self._on_change)
            if self.intent is not None:
                self.disk.remove_guard(self.intent)
            self._listening = False

    def abort(self):
        self._stop_listening()

    def clean(self):
        self._stop_listening()
        if self.target is not None:
            self.target.close()
        self._through.drop()
