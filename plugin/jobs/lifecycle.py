"""A job's lifecycle: start, the verbs, and the completion sequence (QEMU's job.c).

Part of :class:`plugin.jobs.engine.Job`, split out by concern: ``Job``
inherits :class:`JobLifecycle`, which reads and writes Job's fields under
Job's two locks (the lock rules are in engine.py).  Every method here that
changes the state takes ``_lifecycle`` first: a verb never sees a job half
way through the completion sequence, as QEMU's main loop guarantees.

The completion sequence, after ``run()`` returns or raises (or a cancel
ends a job that never started), as in QEMU's job_completed / job_finalize:

* failed or force-cancelled -> aborting -> ``abort()``;
* succeeded -> waiting -> pending (BLOCK_JOB_PENDING unless auto-finalize),
  then, automatically or at job-finalize, ``prepare()`` (raising there
  turns success into failure) and ``commit()``;
* ``clean()`` always; the durable record is forgotten; BLOCK_JOB_COMPLETED
  or BLOCK_JOB_CANCELLED; concluded; dismiss (automatic or the verb):
  the registry forgets the job, then null.

docs/jobs.md has the state table, the verb table and the event order.
"""

from __future__ import annotations

import errno
import logging
import os

from ..core.errors import CommandError, error_text
from ..core.threads import Thread
from .states import VERBS, refused_verb_error

log = logging.getLogger(__name__)


class JobLifecycle:
    """Start, the verbs and the completion sequence of a Job (see the module docstring)."""

    def start(self) -> None:
        """created -> running, and start the job thread (QEMU's job_start)."""
        with self._lifecycle, self._cond:
            if self._status != "created" or self._thread is not None:
                raise RuntimeError(f"job {self.id} cannot start in state {self._status}")
            self._busy = True
            self._transition("running")
            self._thread = Thread(target=self._thread_main,
                                  name=f"job-{self.id}", daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job thread to end; True if it has (or never started)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # ------------------------------------------------------------------
    # The verbs (QEMU's job_user_*), called by the command layer

    def user_pause(self) -> None:
        """The pause verb (QEMU's job_user_pause)."""
        with self._lifecycle, self._cond:
            self._apply_verb("pause")
            if self._user_paused:
                raise CommandError("Job is already paused")
            self._user_paused = True
            self._pause_count += 1
            self._kick_locked()
        self._save()

    def user_resume(self) -> None:
        """The resume verb; also resets io-status to ok."""
        with self._lifecycle:
            with self._cond:
                if not self._user_paused or self._pause_count <= 0:
                    raise CommandError("Can't resume a job that was not paused")
                self._apply_verb("resume")
                self._user_resume_locked()
                self._kick_locked()
            self._save()

    def user_set_speed(self, speed: int) -> None:
        """The set-speed verb; 0 means unlimited."""
        with self._lifecycle, self._cond:
            self._apply_verb("set-speed")
            if speed < 0:
                raise CommandError("Parameter 'speed' expects a non-negative value")
            old = self._rate.speed
            self._rate.set_speed(speed, self.clock.now())
            if speed == 0 or speed > old:
                self._kick_locked()
        self._save()

    def user_complete(self) -> None:
        """The complete verb (only in ready/standby)."""
        with self._lifecycle:
            with self._cond:
                self._apply_verb("complete")
                if self._cancel_requested:
                    raise CommandError(f"The active block job '{self.id}' cannot be completed")
            self.complete_requested()
            with self._cond:
                self._should_complete = True
                self._kick_locked()

    def user_cancel(self, force: bool = False) -> None:
        """The cancel verb (QEMU's job_user_cancel)."""
        with self._lifecycle:
            with self._cond:
                self._apply_verb("cancel")
            self._cancel(force)

    def user_finalize(self) -> None:
        """The finalize verb: run prepare/commit (or abort) now, in this thread."""
        with self._lifecycle:
            with self._cond:
                self._apply_verb("finalize")
            self._do_finalize()

    def user_dismiss(self) -> None:
        """The dismiss verb: concluded -> null; the registry forgets the job."""
        with self._lifecycle:
            with self._cond:
                self._apply_verb("dismiss")
            self._do_dismiss()

    def user_change(self, **opts) -> None:
        """block-job-change: check the verb and the options, then ``change()``."""
        with self._lifecycle:
            with self._cond:
                self._apply_verb("change")
            if not self.changeable_options:
                raise CommandError("Job type does not support change")
            for name in opts:
                if name not in self.changeable_options:
                    raise CommandError(f"Job type '{self.type}' does not support changing "
                                       f"'{name.replace('_', '-')}'")
            self.change(**opts)
            self._save()

    def shutdown(self) -> None:
        """Force-cancel whatever the state (dismiss if concluded); for cleanup."""
        with self._lifecycle:
            self._cancel(True)

    def _mark_created(self) -> None:
        """undefined -> created: JobRegistry.add took the job."""
        with self._cond:
            self._transition("created")

    def _apply_verb(self, verb: str) -> None:
        if self._status not in VERBS[verb]:
            raise refused_verb_error(self.id, self._status, verb)

    def _user_resume_locked(self) -> None:
        # QEMU's block_job_user_resume: a user resume clears the error state.
        self._io_status = "ok"
        self._user_paused = False
        self._pause_count -= 1

    # ------------------------------------------------------------------
    # The completion sequence: run() ended (or never ran) -> concluded -> null

    def _thread_main(self) -> None:
        failure = None
        try:
            # As in QEMU, a job paused before it started pauses right here.
            if not self.pause_point():
                self.run()
        except Exception as exc:  # any failure of run() ends the job with an error
            if self.suspended:
                log.info("Job stopped for shutdown job=%s (%s)", self.id, error_text(exc))
                return
            log.warning("Job failed job=%s type=%s error=%s", self.id, self.type,
                        error_text(exc), exc_info=not isinstance(exc, OSError))
            failure = exc
        if self.suspended:
            return              # the record stays; the job goes on after a restart
        try:
            with self._lifecycle:
                with self._cond:
                    self._deferred = True
                    self._busy = False
                    if failure is not None and self._error is None:
                        self._error = error_text(failure)
                self._completed()
        except Exception:
            log.exception("Job completion failed job=%s", self.id)

    def _update_rc_locked(self) -> bool:
        """QEMU's job_update_rc: a forced cancel is an error; errors abort."""
        if self._error is None and self._force_cancel:
            self._error = os.strerror(errno.ECANCELED)
        if self._error is not None:
            self._transition("aborting")
            return True
        return False

    def _completed(self) -> None:
        """run() is over (or never ran): go to aborting or waiting/pending."""
        with self._cond:
            failed = self._update_rc_locked()
            if not failed:
                self._transition("waiting")
                self._transition("pending")
                if not self.auto_finalize:
                    self._emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})
        if failed:
            self._finalize_single()
        elif self.auto_finalize:
            self._do_finalize()

    def _do_finalize(self) -> None:
        with self._cond:
            ok = self._error is None
        if ok:
            try:
                self.prepare()
            except Exception as exc:
                if self.suspended:
                    log.info("Job completion interrupted by shutdown job=%s (%s)", self.id,
                             error_text(exc))
                    return      # the record stays: the job resumes after a restart
                log.warning("Job prepare failed job=%s error=%s", self.id, error_text(exc),
                            exc_info=not isinstance(exc, OSError))
                with self._cond:
                    self._error = error_text(exc)
        self._finalize_single()

    def _finalize_single(self) -> None:
        with self._cond:
            failed = self._update_rc_locked()
        self._call_hook(self.abort if failed else self.commit)
        self._call_hook(self.clean)
        durable, self.durable = self.durable, None
        if durable is not None:
            # Concluded: the job is gone, on disk too (before the events say so).
            try:
                durable.forget(self)
            except OSError as e:
                log.error("Job record not removed job=%s error=%s", self.id, e)
        with self._cond:
            started = self._thread is not None
            if started:
                data = {"type": self.type, "device": self.id, "len": self._total,
                        "offset": self._offset, "speed": self._rate.speed}
                if self._force_cancel:
                    self._emit("BLOCK_JOB_CANCELLED", data)
                else:
                    if self._error is not None:
                        data["error"] = self._error
                    self._emit("BLOCK_JOB_COMPLETED", data)
            self._transition("concluded")
        if self.auto_dismiss or not started:
            self._do_dismiss()

    def _call_hook(self, hook) -> None:
        # commit/abort/clean cannot fail the job any more (as in QEMU).
        try:
            hook()
        except Exception:
            log.exception("Job hook failed job=%s hook=%s", self.id, hook.__name__)

    def _do_dismiss(self) -> None:
        # Leave the registry before announcing null, so a query made after the
        # event never lists the job (QEMU does both in one main-loop step).
        with self._cond:
            callbacks, self._on_null = self._on_null, []
        for callback in callbacks:
            callback(self)
        with self._cond:
            self._busy = False
            self._deferred = True
            self._transition("null")

    def _cancel(self, force: bool) -> None:
        """QEMU's job_cancel; _lifecycle is held."""
        with self._cond:
            status = self._status
            if status == "null":
                return
            if status != "concluded":
                if not (self.soft_cancel_when_ready and status in ("ready", "standby")):
                    force = True
                if self._user_paused:
                    self._user_resume_locked()
                # A soft cancel after run() returned has nothing left to stop.
                if force or not self._deferred:
                    self._cancel_requested = True
                    self._force_cancel = self._force_cancel or force
                started = self._thread is not None
                deferred = self._deferred
                self._kick_locked()
        if status == "concluded":
            self._do_dismiss()
        elif not started:
            self._completed()
        elif deferred and self.cancelled:
            # Waiting for job-finalize: abort it now.
            self._finalize_single()
        log.info("Job cancel requested job=%s force=%s", self.id, force)
