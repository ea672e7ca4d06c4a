"""ErrorLog: the I/O errors a job met, as the operator sees them.

Two things a job keeps about its errors, apart from the policy that decides
what each one means (plugin/core/policy.py):

- the last error (operation, errno, how many times in a row, when), so that
  query-block-jobs can say why a job paused or is retrying (``x-last-error``),
  and how many of each kind there were (``x-error-counts``);
- when BLOCK_JOB_ERROR was last emitted per operation: under ``ignore`` a
  persistent fault fails every request, and the events must not flood the
  clients.  The first one is always emitted; "stop" and "report" are never
  held back.

Not thread-safe by itself: the job calls it under its own lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..core.errors import errno_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LastError:
    """The job's last I/O error; ``count`` identical ones in a row."""

    operation: str          # "read" or "write"
    errno: str              # its name, e.g. "ENOSPC"
    desc: str               # strerror text
    count: int
    time_us: int            # wall clock of the latest one, microseconds since the epoch


class ErrorLog:
    """The last error of one job and the pacing of its BLOCK_JOB_ERROR events."""

    def __init__(self, job_id: str):
        self._job_id = job_id
        self._last: LastError | None = None
        self._events: dict = {}     # operation -> (last emit time, suppressed count)
        self._counts: dict = {}     # (operation, errno name) -> errors since the start

    @property
    def last(self) -> LastError | None:
        """A copy of the last error, or None if there was none."""
        return None if self._last is None else dataclasses.replace(self._last)

    def note(self, operation: str, err: int) -> None:
        """Record one failed request (``err`` is an errno number)."""
        name = errno_name(err)
        self._counts[(operation, name)] = self._counts.get((operation, name), 0) + 1
        last = self._last
        if last is not None and last.operation == operation and last.errno == name:
            last.count += 1
        else:
            last = self._last = LastError(operation, name, os.strerror(err), 1, 0)
        last.time_us = int(time.time() * 1e6)

    @property
    def counts(self) -> tuple:
        """((operation, errno name, count), ...) of every error since the job started
        in this process, sorted (``x-error-counts``; jobctl metrics)."""
        return tuple((op, name, n) for (op, name), n in sorted(self._counts.items()))

    def should_emit(self, operation: str, action: str, now: float, interval: float) -> bool:
        """Whether this error's BLOCK_JOB_ERROR goes out (``now`` on the job's clock).

        Under ``ignore`` at most one per ``interval`` seconds per operation;
        how many were held back is logged when the next one goes out.
        """
        if action != "ignore":
            return True
        last, suppressed = self._events.get(operation, (None, 0))
        if last is not None and now - last < interval:
            self._events[operation] = (last, suppressed + 1)
            return False
        if suppressed:
            log.info("Job error events coalesced job=%s operation=%s count=%d",
                     self._job_id, operation, suppressed)
        self._events[operation] = (now, 0)
        return True
