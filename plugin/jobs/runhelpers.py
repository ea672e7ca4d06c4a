"""What a job's ``run()`` calls: pause points, sleeping, the speed limit,
progress, READY, and I/O errors (QEMU's job_pause_point, job_sleep_ns,
block_job_ratelimit_sleep, job_transition_to_ready, block_job_error_action).

Part of :class:`plugin.jobs.engine.Job`, split out by concern: ``Job``
inherits :class:`RunHelpers`, which reads and writes Job's fields under
Job's ``_cond`` (the lock rules are in engine.py).  None of these take
``_lifecycle``: ``run()`` never holds it.

``report_io_error`` is THE decision point for a job's I/O errors: the
policy (plugin/core/policy.py), the io-status, the pause, the
BLOCK_JOB_ERROR event (paced by errorlog.py), as QEMU's
block_job_error_action; mirror and stream only act on its answer.
"""

from __future__ import annotations

import logging
import os
import threading

from ..core import policy
from ..core.errors import errno_name

log = logging.getLogger(__name__)


class RunHelpers:
    """The Job methods a ``run()`` calls (see the module docstring)."""

    def pause_point(self) -> bool:
        """Block here while a pause is requested; return ``cancelled``.

        In the job thread this moves to paused (or standby when ready) for
        the duration of the pause and back afterwards, as QEMU's
        job_pause_point; call it between units of work.  A subclass's
        worker threads may call it too: they just wait, the status is the
        job thread's business.
        """
        with self._cond:
            if self._pause_count == 0 or self._force_cancel:
                return self._force_cancel
            if threading.current_thread() is not self._thread:
                while self._pause_count > 0 and not self._force_cancel:
                    self._cond.wait()
                return self._force_cancel
        # Pausing: the record keeps the progress as of now, before "paused" is
        # announced (a crash right after the event finds the record saved).
        self._save()
        with self._cond:
            if self._pause_count > 0 and not self._force_cancel:
                resume_to = self._status
                self._transition("standby" if resume_to == "ready" else "paused")
                self._busy = False
                while self._pause_count > 0 and not self._force_cancel:
                    self._cond.wait()
                self._busy = True
                self._transition(resume_to)
            return self._force_cancel

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, then pass a pause point; return ``cancelled``.

        Returns early when the job is cancelled, paused (after the pause
        ends), or kicked (set-speed, complete, resume, ``kick()``): callers
        that need the full delay loop on their own condition.  Any thread of
        the job may call it.
        """
        in_job_thread = threading.current_thread() is self._thread
        with self._cond:
            if self._force_cancel:
                return True
            kicks = self._kicks
            deadline = self.clock.now() + seconds
            if in_job_thread:
                self._busy = False
            while (self._kicks == kicks and not self._force_cancel
                   and self._pause_count == 0):
                remaining = deadline - self.clock.now()
                if remaining <= 0:
                    break
                self.clock.wait(self._cond, remaining)
            if in_job_thread:
                self._busy = True
        return self.pause_point()

    def throttle(self, nbytes: int) -> bool:
        """Account ``nbytes`` of work against ``speed``; sleep as needed.

        Returns ``cancelled``.  With speed 0 it never sleeps.  A speed change
        (set-speed) takes effect immediately, even during the sleep.  Worker
        threads of one job share its budget.
        """
        with self._cond:
            self._rate.account(nbytes, self.clock.now())
        while True:
            with self._cond:
                delay = self._rate.delay(self.clock.now())
            if delay <= 0:
                return self.cancelled
            if self.sleep(delay):
                return True

    def kick(self) -> None:
        """Wake the job from sleep() early; callable from any thread."""
        with self._cond:
            self._kick_locked()

    def set_progress(self, offset: int | None = None, total: int | None = None) -> None:
        """Set the progress counters (bytes); None leaves one unchanged."""
        with self._cond:
            if offset is not None:
                self._offset = offset
            if total is not None:
                self._total = total

    def advance_progress(self, nbytes: int) -> None:
        """Add ``nbytes`` to the progress offset (thread-safe)."""
        with self._cond:
            self._offset += nbytes

    def transition_to_ready(self) -> None:
        """running -> ready, then BLOCK_JOB_READY (a no-op if already ready)."""
        with self._cond:
            if self._status in ("ready", "standby"):
                return
            first = not self._ready_seen
            self._ready_seen = True
        if first:
            self._save()          # before the event: a crash after it finds ready-seen
        with self._cond:
            if self._status in ("ready", "standby"):
                return
            self._transition("ready")
            self._emit("BLOCK_JOB_READY", {
                "type": self.type, "device": self.id, "len": self._total,
                "offset": self._offset, "speed": self._rate.speed})

    def report_io_error(self, operation: str, error_errno: int, on_error: str) -> str:
        """Apply the error policy to a failed request; return the action.

        Emits BLOCK_JOB_ERROR {device, operation, action}.  For "stop": the
        job becomes user-paused and its io-status "failed" or "nospace" (the
        first error wins until resume).  Called from the job thread, a
        "stop" blocks here until the job is resumed or cancelled (check
        ``cancelled`` before retrying); from another thread it returns at
        once and the job pauses at its next pause point.

        The caller acts on the answer: "report" -> fail (raise), "ignore" ->
        retry later (with some back-off), "stop" -> retry.
        """
        action = policy.error_action(on_error, operation, error_errno)
        with self._cond:
            self._errors.note(operation, error_errno)
            if self._errors.should_emit(operation, action, self.clock.now(),
                                        self.ERROR_EVENT_INTERVAL):
                # x-errno / x-desc: why, an extension of QEMU's event (QEMU clients ignore them).
                self._emit("BLOCK_JOB_ERROR", {
                    "device": self.id, "operation": operation, "action": action,
                    "x-errno": errno_name(error_errno), "x-desc": os.strerror(error_errno)})
            if action == "stop":
                if not self._user_paused:
                    self._user_paused = True
                    self._pause_count += 1
                    self._kick_locked()
                if self._io_status == "ok":
                    self._io_status = policy.io_status_for(error_errno)
        if action == "stop":
            self._save()
        log.info("Job I/O error job=%s operation=%s errno=%s policy=%s action=%s",
                 self.id, operation, errno_name(error_errno),
                 on_error, action)
        if action == "stop" and threading.current_thread() is self._thread:
            self.pause_point()
        return action
