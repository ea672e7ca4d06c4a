"""The single place that decides what an I/O error means for a job.

Mirrors QEMU's ``block_job_error_action()``: a job's error policy
(``on-source-error``, ``on-target-error``, ``on-error``; or a disk's
``werror``/``rerror``) and the errno of a failed request give the *action*:

========== =================== ==================
policy     errno == ENOSPC     any other errno
========== =================== ==================
report     report              report
ignore     ignore              ignore
stop       stop                stop
enospc     stop                report
auto       stop                report
========== =================== ==================

Actions: ``report`` ends the job with the error, ``ignore`` carries on (the
caller retries later), ``stop`` pauses the job until the user resumes it.
Whether the failed request was a read or a write never changes the action
(as in QEMU); it only goes into the ``BLOCK_JOB_ERROR`` event.

When the action is ``stop`` the job's io-status becomes ``nospace`` for
ENOSPC and ``failed`` otherwise (see :func:`io_status_for`).

This module has no side effects: the event, the pause and the io-status
change are done by ``Job.report_io_error()``, the only caller for jobs.
"""

from __future__ import annotations

import errno

POLICIES = ("report", "ignore", "enospc", "stop", "auto")
"""Accepted policy values, in QEMU's BlockdevOnError order (usable as a QMP enum)."""

ACTIONS = ("ignore", "report", "stop")
"""Possible actions (QEMU's BlockErrorAction)."""

OPERATIONS = ("read", "write")
"""Operation kinds carried by BLOCK_JOB_ERROR (QEMU's IoOperationType)."""

# policy -> (action when errno is ENOSPC, action for any other errno)
_ACTION_TABLE = {
    "report": ("report", "report"),
    "ignore": ("ignore", "ignore"),
    "stop": ("stop", "stop"),
    "enospc": ("stop", "report"),
    "auto": ("stop", "report"),
}


def error_action(policy: str, operation: str, error_errno: int) -> str:
    """The action ("report", "ignore" or "stop") for an I/O error.

    ``policy`` is one of :data:`POLICIES`, ``operation`` is "read" or
    "write", ``error_errno`` the positive errno of the failure.  Unknown
    policies or operations are programming errors (ValueError): QMP
    argument validation rejects bad values before they get here.
    """
    try:
        on_enospc, otherwise = _ACTION_TABLE[policy]
    except KeyError:
        raise ValueError(f"unknown error policy {policy!r}") from None
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    return on_enospc if error_errno == errno.ENOSPC else otherwise


def io_status_for(error_errno: int) -> str:
    """The io-status a stopped job shows for this errno: "nospace" or "failed"."""
    return "nospace" if error_errno == errno.ENOSPC else "failed"
