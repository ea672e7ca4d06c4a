"""The job engine: QEMU's job state machine, one thread per job.

A job (mirror, stream) is a subclass of :class:`Job` that implements
``run()``; this module does everything else the way QEMU's ``job.c`` and
``blockjob.c`` do: the transitions (tables in states.py), which verb is
allowed in which state, the order of the QMP events, pausing, cancelling,
rate limiting (ratelimit.py), the error policy (through
:mod:`plugin.core.policy`) and the completion sequence (waiting, pending,
finalize, concluded, dismiss).

Longer than most modules on purpose: it is one class whose two locks guard
every field below, and the verbs, the pause points and the completion
sequence only make sense read together against that lock discipline.

Threads and locks
-----------------
``run()`` executes in the job's own thread.  Verbs (``user_pause()``,
``user_cancel()``, ...) are called from the control server's thread.  Two
locks keep this simple:

* ``_cond`` (a Condition) guards every field and is what the job thread
  waits on when it is paused or sleeping.  State changes and their events
  happen under it, so events come out in state order.
* ``_lifecycle`` (an RLock) serialises the verbs with the completion
  sequence, as QEMU's main loop does: a verb never sees a job half way
  through finalization.  ``run()`` never holds it.

Lock order: ``_lifecycle`` before ``_cond``; the registry's lock is never
held while a job lock is taken, except ``_cond`` in ``JobRegistry.add``.

Naming: every "device" field in QMP data (events, BlockJobInfo) is the job
id, as in QEMU.  ``Job.device`` is the disk the job works on; the registry
allows one active job per device.

See docs/jobs.md for the state table, the verb table and the event order.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from ..core import policy
from ..core.errors import CommandError, errno_name, error_text
from .clock import MONOTONIC
from .ratelimit import RateLimiter
from .states import TRANSITIONS, VERBS, refused_verb_error

log = logging.getLogger(__name__)


def _guarded(field: str, doc: str) -> property:
    """A read-only property that reads ``field`` under the job's lock."""
    def get(self):
        with self._cond:
            return getattr(self, field)
    return property(get, doc=doc)


class Job:
    """Base class of a block job: the state machine around a ``run()``.

    Subclass API (everything else is internal or for the command layer):

    Override
      ``run()``                 the work, in the job thread.  Return to
                                succeed; raise to fail (an OSError's errno
                                becomes the strerror text of the error).
                                Must return soon after ``cancelled`` turns
                                True; it sees that from pause_point(),
                                sleep() and throttle().
      ``prepare()``             after success, before commit (mirror pivots
                                here); raising turns success into failure.
      ``commit()`` / ``abort()`` exactly one of them, after success / failure
                                or cancel.
      ``clean()``               always, last.
      ``complete_requested()``  the ``complete`` verb was accepted (the job
                                is ready); raise CommandError to refuse it.
                                Afterwards ``should_complete`` is True.
      ``change(**opts)``        block-job-change with the options named in
                                ``changeable_options`` (underscore names,
                                e.g. ``copy_mode``); raise CommandError to refuse.
      ``soft_cancel_when_ready`` class flag: if True, a non-forced cancel
                                while ready only sets ``cancel_requested``
                                (the job finishes normally, e.g. mirror
                                without pivot); otherwise every cancel is
                                forced, as QEMU does for jobs without a
                                .cancel callback.

    Call from run()
      ``pause_point()``, ``sleep(seconds)``, ``throttle(nbytes)``,
      ``set_progress(offset, total)``, ``advance_progress(nbytes)``,
      ``transition_to_ready()``, ``report_io_error(operation, errno, policy)``,
      and read ``cancelled``, ``cancel_requested``, ``should_complete``,
      ``is_ready``, ``speed``.  ``kick()`` may be called from any thread to
      wake a sleeping job early (e.g. new dirty data).

    prepare/commit/abort/clean run in the job thread when finalization is
    automatic, otherwise in the thread of the verb that triggered it
    (job-finalize, a cancel); they must not call pause_point() or sleep().

    Durable jobs (docs/jobs.md, "Jobs outlive the process")
      ``durable``               an object with save(job) and forget(job)
                                (plugin/jobs/record.py), or None.  The engine
                                saves after every change a restart must keep
                                (pause, resume, set-speed, change, a stop on
                                error, ready) and forgets the job as it
                                concludes, before BLOCK_JOB_COMPLETED/CANCELLED.
      ``settings()``            override: the type's settings for the record.
      ``saved_state()``         the engine's part of the record.
      ``restore_state(...)``    before start(): paused, io-status, progress.
      ``suspend()``             process shutdown: save, stop the thread, keep
                                the record (no events, no completion).
    """

    soft_cancel_when_ready = False
    changeable_options: frozenset = frozenset()

    # BLOCK_JOB_ERROR events for errors that are ignored repeat at most this
    # often per operation (persistent faults must not flood clients); the
    # first one is always emitted, and "stop"/"report" are never held back.
    ERROR_EVENT_INTERVAL = 1.0

    def __init__(self, job_id: str, job_type: str, bus, device: str | None = None,
                 speed: int = 0, auto_finalize: bool = True, auto_dismiss: bool = True,
                 clock=None):
        if speed < 0:
            raise CommandError("Parameter 'speed' expects a non-negative value")
        self.id, self.type, self.device = job_id, job_type, device
        self.auto_finalize, self.auto_dismiss = auto_finalize, auto_dismiss
        self._bus = bus
        self.clock = clock or MONOTONIC
        self._lifecycle = threading.RLock()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._status = "undefined"
        self._busy = False
        self._pause_count = 0
        self._user_paused = False
        self._cancel_requested = False
        self._force_cancel = False
        self._should_complete = False
        self._deferred = False          # run() has returned
        self._error: str | None = None
        self._io_status = "ok"
        self._offset = 0
        self._total = 0
        self._kicks = 0
        self._rate = RateLimiter(speed, self.clock.now())
        self._error_events: dict = {}   # operation -> (last emit time, suppressed count)
        self._last_error: dict | None = None   # x-last-error of query-block-jobs
        self._on_null: list = []
        self.durable = None             # record keeper (save/forget), see plugin/jobs/record.py
        self._ready_seen = False
        self._suspended = False

    # ------------------------------------------------------------------
    # Hooks for subclasses

    def run(self) -> None:
        """The job's work; see the class docstring."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called once after a successful run, before commit()."""

    def commit(self) -> None:
        """Called after success (after prepare())."""

    def abort(self) -> None:
        """Called after failure or cancellation."""

    def clean(self) -> None:
        """Called last in every case."""

    def complete_requested(self) -> None:
        """The complete verb was accepted; raise CommandError to refuse it."""

    def change(self, **opts) -> None:
        """Apply block-job-change options listed in ``changeable_options``."""

    def policies(self) -> dict:
        """The job's error policies and modes by QMP name (x-policies of query-block-jobs)."""
        return {}

    def type_info(self) -> dict:
        """QEMU's members of BlockJobInfo for this job type (its union branch:
        a mirror's actively-synced).  Called without the job's lock."""
        return {}

    def copied_bytes(self) -> int | None:
        """Bytes actually written so far (no zero ranges): what the speed limit counts."""
        return None

    def settings(self) -> dict:
        """The job's type-specific settings, for its durable record."""
        return {}

    # ------------------------------------------------------------------
    # Durability (plugin/jobs/record.py keeps the record)

    @property
    def suspended(self) -> bool:
        """The process is shutting down: stop, keep the record, conclude nothing."""
        with self._cond:
            return self._suspended

    def saved_state(self) -> dict:
        """The engine's part of the job record."""
        with self._cond:
            return {"id": self.id, "type": self.type, "device": self.device,
                    "speed": self._rate.speed, "auto-finalize": self.auto_finalize,
                    "auto-dismiss": self.auto_dismiss, "paused": self._user_paused,
                    "io-status": self._io_status, "ready-seen": self._ready_seen,
                    "offset": self._offset, "len": self._total}

    def restore_state(self, paused: bool, io_status: str, offset: int, total: int,
                      ready_seen: bool) -> None:
        """Before start(): come back as the record says (paused, io-status, progress)."""
        with self._cond:
            if paused and not self._user_paused:
                self._user_paused = True
                self._pause_count += 1
            self._io_status = io_status if paused else "ok"
            self._offset = offset
            self._total = max(offset, total)
            self._ready_seen = ready_seen

    def _save(self) -> None:
        durable = self.durable
        if durable is None:
            return
        try:
            durable.save(self, shutdown=self.suspended)
        except OSError as e:
            log.error("Job record not saved id=%s error=%s", self.id, e)

    def suspend(self) -> None:
        """Process shutdown: save the record, then make run() return (the record stays)."""
        with self._cond:
            if self._status in ("concluded", "null") or self._suspended:
                return
        durable = self.durable
        if durable is None:
            self.shutdown()           # nothing keeps it: it ends with the process
            return
        if durable is not None:
            try:
                durable.save(self, shutdown=True)
            except OSError as e:
                log.error("Job record not saved at shutdown id=%s error=%s", self.id, e)
        with self._cond:
            self._suspended = True
            self._force_cancel = True
            self._kick_locked()
        log.info("Job suspended id=%s", self.id)

    # ------------------------------------------------------------------
    # State, read from any thread

    status = _guarded("_status", "The job's state (states.py).")
    cancelled = _guarded("_force_cancel",
                         "The job must stop as soon as possible (QEMU's job_is_cancelled).")
    cancel_requested = _guarded("_cancel_requested", "Any cancel was accepted, soft ones included.")
    should_complete = _guarded("_should_complete", "The complete verb was accepted.")
    user_paused = _guarded("_user_paused", "Paused by a pause verb or by an error with action stop.")
    io_status = _guarded("_io_status", "ok, failed or nospace (QEMU's BlockDeviceIoStatus).")
    error = _guarded("_error", "The error text the job ends with, if any.")

    @property
    def is_ready(self) -> bool:
        """True in ready and standby (QEMU's job_is_ready)."""
        with self._cond:
            return self._status in ("ready", "standby")

    @property
    def speed(self) -> int:
        with self._cond:
            return self._rate.speed

    @property
    def progress(self) -> tuple[int, int]:
        """(offset, total) in bytes."""
        with self._cond:
            return self._offset, self._total

    def block_info(self) -> dict:
        """QEMU's BlockJobInfo for query-block-jobs."""
        members = self.type_info()
        with self._cond:
            return self._with_error({
                "type": self.type,
                "device": self.id,
                "len": self._total,
                "offset": self._offset,
                "busy": self._busy,
                "paused": self._pause_count > 0,
                "speed": self._rate.speed,
                "io-status": self._io_status,
                "ready": self._status in ("ready", "standby"),
                "status": self._status,
                "auto-finalize": self.auto_finalize,
                "auto-dismiss": self.auto_dismiss,
                **members,
                **self._extensions(),
            })

    def job_info(self) -> dict:
        """QEMU's JobInfo for query-jobs."""
        with self._cond:
            return self._with_error({
                "id": self.id, "type": self.type, "status": self._status,
                "current-progress": self._offset, "total-progress": self._total,
            })

    def _extensions(self) -> dict:
        # Our additions to BlockJobInfo, x- prefixed as QEMU's own extensions are.
        ext = {}
        policies = self.policies()
        if policies:
            ext["x-policies"] = policies
        copied = self.copied_bytes()
        if copied is not None:
            ext["x-copied-bytes"] = copied
        if self._last_error is not None:
            ext["x-last-error"] = dict(self._last_error)
        return ext

    def _with_error(self, info: dict) -> dict:
        # QEMU's "error" member: present only once the job has failed.
        if self._error is not None:
            info["error"] = self._error
        return info

    # ------------------------------------------------------------------
    # Helpers for run()

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
            self._note_error(operation, error_errno)
            self._emit_error_event(operation, action, error_errno)
            if action == "stop":
                if not self._user_paused:
                    self._user_paused = True
                    self._pause_count += 1
                    self._kick_locked()
                if self._io_status == "ok":
                    self._io_status = policy.io_status_for(error_errno)
        if action == "stop":
            self._save()
        log.info("Job I/O error id=%s operation=%s errno=%s policy=%s action=%s",
                 self.id, operation, errno_name(error_errno),
                 on_error, action)
        if action == "stop" and threading.current_thread() is self._thread:
            self.pause_point()
        return action

    # ------------------------------------------------------------------
    # Lifecycle: start and the verbs (called by the command layer)

    def start(self) -> None:
        """created -> running, and start the job thread (QEMU's job_start)."""
        with self._lifecycle, self._cond:
            if self._status != "created" or self._thread is not None:
                raise RuntimeError(f"job {self.id} cannot start in state {self._status}")
            self._busy = True
            self._transition("running")
            self._thread = threading.Thread(target=self._thread_main,
                                            name=f"job-{self.id}", daemon=True)
            self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the job thread to end; True if it has (or never started)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

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

    # ------------------------------------------------------------------
    # Internals

    def _emit(self, name: str, data: dict) -> None:
        # Called with _cond held so that events leave in state order.
        log.debug("Job event id=%s event=%s data=%s", self.id, name, data)
        self._bus.emit(name, data)

    def _transition(self, new: str) -> None:
        old = self._status
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"job {self.id}: illegal transition {old} -> {new}")
        self._status = new
        if new != old:
            log.info("Job status change id=%s from=%s to=%s", self.id, old, new)
            self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new})

    def _apply_verb(self, verb: str) -> None:
        if self._status not in VERBS[verb]:
            raise refused_verb_error(self.id, self._status, verb)

    def _mark_created(self) -> None:
        with self._cond:
            self._transition("created")

    def _kick_locked(self) -> None:
        self._kicks += 1
        self._cond.notify_all()

    def _user_resume_locked(self) -> None:
        # QEMU's block_job_user_resume: a user resume clears the error state.
        self._io_status = "ok"
        self._user_paused = False
        self._pause_count -= 1

    def _note_error(self, operation: str, err: int) -> None:
        # The job keeps its last error so the operator can see why it paused.
        name = errno_name(err)
        last = self._last_error
        if last is not None and last["operation"] == operation and last["errno"] == name:
            last["count"] += 1
        else:
            last = self._last_error = {"operation": operation, "errno": name,
                                       "desc": os.strerror(err), "count": 1}
        seconds, micro = divmod(int(time.time() * 1e6), 1000000)
        last["time"] = {"seconds": seconds, "microseconds": micro}

    def _emit_error_event(self, operation: str, action: str, err: int) -> None:
        now = self.clock.now()
        if action == "ignore":
            last, suppressed = self._error_events.get(operation, (None, 0))
            if last is not None and now - last < self.ERROR_EVENT_INTERVAL:
                self._error_events[operation] = (last, suppressed + 1)
                return
            if suppressed:
                log.info("Job error events coalesced id=%s operation=%s count=%d",
                         self.id, operation, suppressed)
            self._error_events[operation] = (now, 0)
        # x-errno / x-desc: why, an extension of QEMU's event (QEMU clients ignore them).
        self._emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": operation,
                                       "action": action, "x-errno": errno_name(err),
                                       "x-desc": os.strerror(err)})

    def _thread_main(self) -> None:
        failure = None
        try:
            # As in QEMU, a job paused before it started pauses right here.
            if not self.pause_point():
                self.run()
        except Exception as exc:  # any failure of run() ends the job with an error
            if self.suspended:
                log.info("Job stopped for shutdown id=%s (%s)", self.id, error_text(exc))
                return
            log.warning("Job failed id=%s type=%s error=%s", self.id, self.type,
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
            log.exception("Job completion failed id=%s", self.id)

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
                    log.info("Job completion interrupted by shutdown id=%s (%s)", self.id,
                             error_text(exc))
                    return      # the record stays: the job resumes after a restart
                log.warning("Job prepare failed id=%s error=%s", self.id, error_text(exc),
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
                log.error("Job record not removed id=%s error=%s", self.id, e)
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
            log.exception("Job hook failed id=%s hook=%s", self.id, hook.__name__)

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
        log.info("Job cancel requested id=%s force=%s", self.id, force)
