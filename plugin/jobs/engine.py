"""The job engine: QEMU's job state machine, one thread per job.

A job (mirror, stream) is a subclass of :class:`Job` that implements
``run()``; the engine does everything else the way QEMU's ``job.c`` and
``blockjob.c`` do: the transitions (tables in states.py), which verb is
allowed in which state, the order of the QMP events, pausing, cancelling,
rate limiting (ratelimit.py), the error policy (through
:mod:`plugin.core.policy`) and the completion sequence (waiting, pending,
finalize, concluded, dismiss).

``Job`` is one class whose two locks guard every field, written in three
modules by concern: this one (the fields, the hooks, durability, the state
queries), runhelpers.py (what ``run()`` calls: pause points, sleep,
throttle, READY, I/O errors) and lifecycle.py (start, the verbs, the
completion sequence).  errorlog.py keeps the last error.

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
allows one active job per device.  The engine builds its events' data
(the jobs layer cannot import qmp/); the query replies are shaped in
plugin/qmp/job_info.py from :meth:`Job.snapshot`.

See docs/jobs.md for the state table, the verb table and the event order.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from ..core.errors import CommandError
from .clock import MONOTONIC
from .errorlog import ErrorLog, LastError
from .lifecycle import JobLifecycle
from .ratelimit import RateLimiter
from .runhelpers import RunHelpers
from .states import TRANSITIONS

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class JobState:
    """One consistent reading of a job's state; the QMP layer shapes its replies from it."""

    status: str                 # states.py
    busy: bool                  # working, not waiting in a pause or a sleep
    paused: bool                # a pause is in effect (a verb, an error with stop)
    offset: int                 # progress, bytes
    total: int
    speed: int                  # bytes/s, 0 = unlimited
    io_status: str              # ok, failed, nospace
    error: str | None           # the error text the job ends with
    last_error: LastError | None
    error_counts: tuple         # ((operation, errno name, count), ...)

    @property
    def ready(self) -> bool:
        """ready or standby (QEMU's job_is_ready)."""
        return self.status in ("ready", "standby")

def _guarded(field: str, doc: str) -> property:
    """A read-only property that reads ``field`` under the job's lock."""
    def get(self):
        with self._cond:
            return getattr(self, field)
    return property(get, doc=doc)


class Job(JobLifecycle, RunHelpers):
    """Base class of a block job: the state machine around a ``run()``.

    The fields, the hooks, durability and the state queries are here; what
    ``run()`` calls is in runhelpers.py, start, the verbs and the completion
    sequence in lifecycle.py (both inherited).

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
        self._errors = ErrorLog(job_id)  # the last error, the pacing of BLOCK_JOB_ERROR
        self._on_null: list = []
        self.durable = None             # record keeper (save/forget), see plugin/jobs/record.py
        self._ready_seen = False
        self._suspended = False
        self._shutting_down = False   # suspend() began: every record saved says shutdown

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

    @property
    def shutting_down(self) -> bool:
        """suspend() began: a record saved from now on is a shutdown record
        (JobRecords.save reads this under its lock, so a checkpoint's save that
        waited for suspend()'s does not write shutdown=false over it)."""
        with self._cond:
            return self._shutting_down or self._suspended

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
            durable.save(self)
        except OSError as e:
            log.error("Job record not saved job=%s error=%s", self.id, e)

    def suspend(self) -> None:
        """Process shutdown: save the record, then make run() return (the record stays)."""
        with self._cond:
            if self._status in ("concluded", "null") or self._suspended:
                return
            self._shutting_down = True
        durable = self.durable
        if durable is None:
            self.shutdown()           # nothing keeps it: it ends with the process
            return
        if durable is not None:
            try:
                durable.save(self, shutdown=True)
            except OSError as e:
                log.error("Job record not saved at shutdown job=%s error=%s", self.id, e)
        with self._cond:
            self._suspended = True
            self._force_cancel = True
            self._kick_locked()
        log.info("Job suspended job=%s", self.id)

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

    def snapshot(self) -> JobState:
        """The job's state read at one instant (query-block-jobs, query-jobs)."""
        with self._cond:
            return JobState(status=self._status, busy=self._busy, paused=self._pause_count > 0,
                            offset=self._offset, total=self._total, speed=self._rate.speed,
                            io_status=self._io_status, error=self._error,
                            last_error=self._errors.last,
                            error_counts=self._errors.counts)

    # ------------------------------------------------------------------
    # Internals shared by the parts (runhelpers.py, lifecycle.py)

    def _emit(self, name: str, data: dict) -> None:
        # Called with _cond held so that events leave in state order.
        log.debug("Job event job=%s event=%s data=%s", self.id, name, data)
        self._bus.emit(name, data)

    def _transition(self, new: str) -> None:
        old = self._status
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"job {self.id}: illegal transition {old} -> {new}")
        self._status = new
        if new != old:
            log.info("Job status change job=%s from=%s to=%s", self.id, old, new)
            self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new})

    def _kick_locked(self) -> None:
        self._kicks += 1
        self._cond.notify_all()

