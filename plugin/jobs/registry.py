"""The registry of this process's jobs: ids, one active job per device, shutdown."""

from __future__ import annotations

import logging
import re
import threading
import time

from ..core.errors import CommandError
from .engine import Job

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")



class JobRegistry:
    """All jobs of this process by id, newest first (as QEMU lists them).

    Enforces unique, well-formed ids and at most one active (not yet
    concluded) job per device.  Jobs leave the registry when they reach
    null (dismissed).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: list[Job] = []

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
