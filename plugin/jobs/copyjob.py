"""CopyJob: what every job that copies the disk to a target shares (mirror, and the
backup and commit to come), as QEMU's blockjob.c is shared by mirror.c and
backup.c.

It wires the copy machinery (plugin/blockcopy/) to the job engine (engine.py):
the copy pipeline, the flush pipeline with its checkpoints, the target link
and the trust in its instance, the comparison a restored job makes.  What is
the job's own (when it is READY, what complete does) stays in the subclass.

Where a copy's failure meets the policy: _handle_failures (while running:
report ends the job, ignore hands the ranges to the retry schedule, stop
pauses and retries at once) and _raise_failures (while finishing: any
failure ends the job), both through Job.report_io_error.
"""

import errno
import logging
import time

from ..blockcopy.flushes import FlushPipeline
from ..blockcopy.link import TargetLink, TargetTrust
from ..blockcopy.pipeline import CopyPipeline, Failure
from ..blockcopy.verify import Comparison
from ..core.errors import os_error
from .engine import Job

log = logging.getLogger(__name__)

# complete / soft cancel: the final copy, flush and pivot must finish within
# this (plus reconnect-delay), or the job ends with an error.
FINAL_SYNC_TIMEOUT = 10.0
# At shutdown (SIGTERM) the job tries one last checkpoint for at most this long.
SHUTDOWN_CHECKPOINT_TIMEOUT = 2.0
# A pause collects the copies in flight first, unless the target answers none
# of them for this long (then it pauses with them, as before).
PAUSE_DRAIN_TIMEOUT = 1.0
# What a job's loop does after _copy_turn: the rest of its turn, the next turn
# (failures were handled), or return from run() (the job was cancelled).
GO_ON, NEXT_TURN, STOP = "go on", "next turn", "stop"
# A turn of a job's loop keeps copies flowing for at most this long (_keep_flowing).
TURN_BUDGET = 0.02


class CopyJob(Job):
    """A job copying `disk` to the target at `target` (an address)."""

    def __init__(self, job_id, job_type, bus, disk, target, granularity, chunk, buf_size,
                 speed, auto_finalize, auto_dismiss, clock, reconnect_delay, intent,
                 restored, target_instance, kind="Mirror"):
        super().__init__(job_id, job_type, bus, device=disk.device, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, clock=clock)
        self.kind = kind
        self.disk = disk
        self.target_address = target
        self.reconnect_delay = reconnect_delay
        self._restored = restored
        now = self.clock.now
        self.copy = CopyPipeline(disk.store, disk.size, granularity, chunk,
                                 max(1, buf_size // chunk), now, job_id, kind)
        # Connects in the background (open_target_within, run()); a restored
        # job connects when it runs, not to a connection that failed while it
        # was paused.
        self.link = TargetLink(target, reconnect_delay, job_id, connect=not restored,
                               kind=kind, on_open=self.copy.use_target)
        self.target_name = self.copy.target_name = self.link.name
        self.bitmap = self.copy.bitmap
        self.flushes = FlushPipeline(self.copy, intent)
        self.compare = Comparison(disk.store, chunk, job_id, now, self.bitmap.mark, kind)
        self.flushes.also_held = self.compare.held_ranges
        self.trust = TargetTrust(self.link, target_instance, restored, self._save)
        self.link.on_loss += [self.trust.unvouch, self.flushes.target_lost]
        self._leave_asked = None      # when the job first saw complete / cancel

    def _pause_point(self):
        """pause_point() at the top of the job's loop, with the copies in flight
        collected first, as QEMU's mirror_pause waits for its I/O.  Each copy holds
        its granules' range lock, which a client waits on to copy before write (a
        backup) or to write through (a mirror): held by a paused job, that wait
        would last as long as the pause (issue 24's soak).  A target that answers
        nothing for PAUSE_DRAIN_TIMEOUT does not hold the pause back."""
        quiet_since = time.monotonic()
        while self.user_paused and not self.cancelled and self.target.in_flight():
            if self.copy.reap(self.target.wait(0.1)):
                quiet_since = time.monotonic()
                self._update_progress()
            elif time.monotonic() - quiet_since > PAUSE_DRAIN_TIMEOUT:
                break
        return self.pause_point()

    def _copy_turn(self, pos):
        """The copying part of a turn of the job's loop (SyncedCopyJob._run,
        BackupJob._run): ranges whose retry is due are dirty again, copies of
        the next dirty ranges start at the job's speed from the cursor pos,
        answers are collected for up to 0.1 s, and failures meet the policy
        (_handle_failures).  Returns the cursor and GO_ON, NEXT_TURN or STOP."""
        copy = self.copy
        for off, n in copy.retries.due():
            self.bitmap.mark(off, n)
        self._update_progress()
        pos = copy.issue(pos, speed=self.speed, throttle=self.throttle)
        self.flushes.mark_copied_due()      # COPIED marks: nothing without an intent log
        if self.cancelled:
            return pos, STOP
        if self.target.in_flight() and not copy.failures:
            self._reap(self.target.wait(0.1))
            pos = self._keep_flowing(pos)
        if copy.failures:
            return pos, STOP if self._handle_failures() else NEXT_TURN
        return pos, GO_ON

    def _keep_flowing(self, pos):
        """While the target answers and nothing failed: start the next copies as
        answers free their places, for up to TURN_BUDGET, without the rest of a
        turn (pause points, progress, checkpoints), which then comes at least
        that often.  A rate-limited job copies one range per turn (issue()).

        Measured on a mirror in READY under 4 KiB client writes: a turn per
        answer cost the job 67-97 us of CPU per copy, this 37-57 us, and the
        client's 99th percentile fell by half (docs/benchmarks.md).  The budget
        is the process's own clock, not the job's: a test clock that stands
        still must not hold the loop."""
        copy, target = self.copy, self.target
        if self.speed:
            return pos
        deadline = time.monotonic() + TURN_BUDGET
        while not copy.failures and time.monotonic() < deadline:
            # throttle: a limit just lifted may still have a copy to pay for.
            pos = copy.issue(pos, throttle=self.throttle)
            if not target.in_flight() or copy.failures:
                break
            if not copy.reap(target.wait(0.1)):
                break               # nothing answered: the turn goes on
        return pos

    def _start_flush(self, final=False, to_ready=True):
        leaving = self.should_complete or self.cancel_requested
        self.flushes.start(leaving, to_ready and not self.is_ready, final)

    def _final_sync(self, before_flush=lambda: None):
        """With clients quiesced: copy what is left, flush, until nothing is left.

        Any failure ends the job (_raise_failures); so does a target that
        answers nothing for FINAL_SYNC_TIMEOUT + reconnect-delay.
        before_flush runs each turn (the write-through's late answers).
        """
        copy = self.copy
        for off, n in copy.retries.drain():
            self.bitmap.mark(off, n)
        pos = 0
        while True:
            while copy.pending() or self.target.in_flight():
                self._check_suspended()
                self._check_stall()
                before_flush()
                pos = copy.issue(pos, final=True)
                self._raise_failures()
                self._reap(self.target.wait(0.1))
                self._raise_failures()
            self._update_progress()
            self._start_flush(final=True)
            self._drain_or_fail()
            # Clean unless a side flush went unanswered (its ranges are dirty
            # again) or the connection was lost meanwhile.
            if not copy.pending():
                return

    @property
    def target(self):
        return self.link.target

    @property
    def intent(self):
        """The write-intent log (blockcopy/intent.py), or None: set by the factory."""
        return self.flushes.intent

    @intent.setter
    def intent(self, log_):
        self.flushes.intent = log_

    def open_target_within(self, timeout):
        """Wait up to timeout for the target connection (the command's thread).

        True if connected and the sizes agree; False if still connecting
        (run() waits for it); raises OSError (cannot connect) or
        CommandError (different sizes).
        """
        if not self.target.wait_open(timeout):
            return False
        self.link.check_size(self.disk.size)
        return True

    def remove_files(self):
        if self.intent is not None:
            self.intent.remove()

    def copied_bytes(self):
        return self.copy.written

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
            if self.target.in_flight() or self.copy.failures or not self.checkpoints():
                return
            self._start_flush(to_ready=False)
            while self.flushes.queue and time.monotonic() < deadline:
                self._reap(self.target.wait(0.1))
            log.info("%s shutdown checkpoint job=%s done=%s", self.kind, self.id,
                     not self.flushes.queue)
        except Exception:
            log.exception("%s shutdown checkpoint failed job=%s", self.kind, self.id)

    def checkpoints(self):
        """True if a target flush makes the job's progress durable (a shutdown
        then checkpoints once): a mirror with an intent log."""
        return self.intent is not None

    def _reap(self, completions):
        if self.copy.reap(completions):
            self._update_progress()

    def _handle_failures(self):
        """Apply the policies to the recorded failures; True if the job was cancelled.

        Requests in flight finish first, so that one incident (a target
        going away fails every request at once) is decided once per
        operation, and a stop pauses a job with nothing in flight.
        """
        copy = self.copy
        if not copy.drain(lambda: self.cancelled):
            return True
        failures = copy.take_failures()
        for operation in ("read", "write"):
            group = [f for f in failures if f.operation == operation]
            if not group:
                continue
            err = group[0].errno
            policy = self.policy_for(operation)
            ranges = [(f.offset, f.length) for f in group if f.length]
            self._update_progress(pending=sum(n for _, n in ranges))
            action = self.report_io_error(operation, err, policy)
            if self.cancelled:
                return True
            if action == "report":
                raise os_error(err, group[0].detail)
            if operation == "write":
                self.link.recover(lambda: self.cancelled, self.clock.now)
            if action == "ignore":
                for off, n in ranges:
                    copy.retries.defer(off, n)
                copy.retries.failed_batch()
            else:
                # stop: report_io_error returned on resume; retry at once.
                for off, n in ranges:
                    self.bitmap.mark(off, n)
        return False

    def policy_for(self, operation):
        """The error policy for a failed "read" (the disk) or "write" (the target)."""
        return self.on_source_error if operation == "read" else self.on_target_error

    def _update_progress(self, pending=0):
        remaining = self.copy.remaining() + self.compare.remaining() + pending
        self.set_progress(self.copy.copied, self.copy.copied + remaining)

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
        if self.clock.now() - max(self._leave_asked, self.copy.last_answer) > bound:
            self.copy.failures.insert(0, Failure(
                "write", errno.ETIMEDOUT, 0, 0,
                "%s answered nothing for %gs while the job was finishing"
                % (self.target_name, bound)))
            self._raise_failures()

    def _check_suspended(self):
        if self.suspended:
            raise OSError(errno.ECANCELED, "the server is shutting down")

    def _raise_failures(self):
        """In prepare(): any failure ends the job, whatever the policy says."""
        failures = self.copy.take_failures()
        if failures:
            failure = failures[0]
            # Still one BLOCK_JOB_ERROR per error: its action is what happens.
            self.report_io_error(failure.operation, failure.errno, "report")
            raise os_error(failure.errno, failure.detail)
