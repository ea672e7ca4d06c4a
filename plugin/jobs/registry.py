"""The registry of this process's jobs: ids, one active job per device, shutdown."""

from __future__ import annotations

import gc
import logging
import re
import threading
import time

from ..core.errors import CommandError
from .engine import Job

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
# A job's objects refer to each other (callbacks: the link, the trust, the
# flushes), so what it held (copy buffers, its dirty bitmap: 16 MiB each for a
# 1 TiB disk) goes only with a full collection, which a quiet server rarely
# runs: 150 mirrors of a 64 MiB disk grew the server from 40 to 326 MiB.  This
# long after a job leaves the registry (its thread has ended), one runs.
REAP_DELAY = 0.5


class JobRegistry:
    """All jobs of this process by id, newest first (as QEMU lists them).

    Enforces unique, well-formed ids and at most one active (not yet
    concluded) job per device.  Jobs leave the registry when they reach
    null (dismissed).
    """

    def __init__(self, reap_delay: float = REAP_DELAY):
        self._lock = threading.Lock()
        self._jobs: list[Job] = []
        self._reap_delay = reap_delay
        self._reaper: threading.Timer | None = None
        self._removed = 0                  # jobs that left (a reap covers those before it)
        self._closed = False

    def add(self, job: Job) -> None:
        """Register a new job and move it to created (JOB_STATUS_CHANGE).

        Raises CommandError with QEMU's texts for a bad or duplicate id or a
        busy device; nothing is emitted then.  Call ``job.start()`` next.
        """
        if not isinstance(job.id, str) or not _ID_RE.match(job.id):
            raise CommandError(f"Invalid job ID '{job.id}'")
        with self._lock:
            if job.device is not None:
                busy = self._active_on(job.device)
                if busy is not None:
                    raise CommandError(f"Node '{job.device}' is busy: block device is in use "
                                   f"by block job: {busy.type}")
            if any(other.id == job.id for other in self._jobs):
                raise CommandError(f"Job ID '{job.id}' already in use")
            job._mark_created()
            job._on_null.append(self._remove)
            self._jobs.insert(0, job)
        log.info("Job created job=%s type=%s device=%s", job.id, job.type, job.device)

    def _active_on(self, device: str) -> Job | None:
        for job in self._jobs:
            if job.device == device and job.status not in ("concluded", "null"):
                return job
        return None

    def _remove(self, job: Job) -> None:
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
            self._removed += 1
            self._schedule_reap()

    def _schedule_reap(self) -> None:
        """(under _lock) A full garbage collection in reap_delay seconds, unless
        one is pending (it runs again if jobs left while it waited)."""
        if self._closed or (self._reaper is not None and self._reaper.is_alive()):
            return
        self._reaper = threading.Timer(self._reap_delay, self._reap, (self._removed,))
        self._reaper.daemon = True
        self._reaper.name = "job-reaper"
        self._reaper.start()

    def _reap(self, removed: int) -> None:
        started = time.monotonic()
        found = gc.collect()
        log.debug("Collected finished jobs objects=%d seconds=%.3f", found,
                  time.monotonic() - started)
        with self._lock:
            self._reaper = None
            if self._removed != removed:     # a job left after this was scheduled
                self._schedule_reap()

    def close(self) -> None:
        """cleanup: no more collections; a pending one is cancelled and joined."""
        with self._lock:
            self._closed = True
            reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            reaper.join()

    def jobs(self) -> list[Job]:
        """A snapshot of the registered jobs, newest first."""
        with self._lock:
            return list(self._jobs)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            for job in self._jobs:
                if job.id == job_id:
                    return job
        return None

    def find(self, job_id: str) -> Job:
        """The job for job-* commands; CommandError "Job not found" otherwise."""
        job = self.get(job_id)
        if job is None:
            raise CommandError("Job not found")
        return job

    def find_block_job(self, job_id: str) -> Job:
        """The job for block-job-* commands; DeviceNotActive otherwise."""
        job = self.get(job_id)
        if job is None:
            raise CommandError(f"Block job '{job_id}' not found", "DeviceNotActive")
        return job

    def active_job(self, device: str) -> Job | None:
        """The job (not yet concluded) working on ``device``, if any."""
        with self._lock:
            return self._active_on(device)

    def suspend_all(self, timeout: float = 3.0) -> bool:
        """Process shutdown: save every job and stop its thread, keeping its record.

        The jobs go on after a restart (plugin/jobs/record.py).  Returns True
        if every job thread ended within ``timeout`` seconds; one that did
        not (blocked on a stalled storage call) is left to die with the
        process: its record was saved first.
        """
        return self._each_then_join("suspend", timeout,
                                    "Job thread still busy at shutdown job=%s (its record is saved)")

    def stop_all(self, timeout: float = 10.0) -> bool:
        """Force-cancel every job and join the threads (nbdkit cleanup).

        Returns True if every job thread ended within ``timeout`` seconds.
        """
        return self._each_then_join("shutdown", timeout, "Job thread did not stop job=%s")

    def _each_then_join(self, method: str, timeout: float, stuck: str) -> bool:
        """Call job.<method>() on every job, then join them all within timeout."""
        jobs = self.jobs()
        for job in jobs:
            try:
                getattr(job, method)()
            except Exception:
                log.exception("Job %s failed job=%s", method, job.id)
        deadline = time.monotonic() + timeout
        stopped = True
        for job in jobs:
            if not job.join(max(0.0, deadline - time.monotonic())):
                log.warning(stuck, job.id)
                stopped = False
        return stopped
