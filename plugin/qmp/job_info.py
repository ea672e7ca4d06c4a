"""The shapes of query-block-jobs and query-jobs: QEMU's BlockJobInfo and JobInfo.

The engine (plugin/jobs/engine.py) exposes a job's state as plain values
(``Job.snapshot()``, ``id``, ``type``, ``policies()``...); this module names
them as QMP does.  As in QEMU, the ``device`` of BlockJobInfo is the job id.
Our additions are ``x-`` prefixed, as QEMU's own extensions are:
``x-policies`` (the error policies and copy mode in force),
``x-copied-bytes`` (bytes written, what the speed limit counts) and
``x-last-error`` (why the job paused or is retrying; docs/errors.md) and
``x-error-counts`` (every error since the job started, by operation and errno).
"""

from __future__ import annotations


def block_job_info(job) -> dict:
    """QEMU's BlockJobInfo of ``job``, with our extensions."""
    state = job.snapshot()
    info = {
        "type": job.type,
        "device": job.id,
        "len": state.total,
        "offset": state.offset,
        "busy": state.busy,
        "paused": state.paused,
        "speed": state.speed,
        "io-status": state.io_status,
        "ready": state.ready,
        "status": state.status,
        "auto-finalize": job.auto_finalize,
        "auto-dismiss": job.auto_dismiss,
    }
    info.update(job.type_info())          # QEMU's members of this job type (actively-synced)
    policies = job.policies()
    if policies:
        info["x-policies"] = policies
    copied = job.copied_bytes()
    if copied is not None:
        info["x-copied-bytes"] = copied
    if state.last_error is not None:
        info["x-last-error"] = last_error_info(state.last_error)
        info["x-error-counts"] = [{"operation": op, "errno": name, "count": n}
                                  for op, name, n in state.error_counts]
    return _with_error(info, state)


def job_info(job) -> dict:
    """QEMU's JobInfo of ``job``."""
    state = job.snapshot()
    return _with_error({
        "id": job.id, "type": job.type, "status": state.status,
        "current-progress": state.offset, "total-progress": state.total,
    }, state)


def last_error_info(last) -> dict:
    """``x-last-error``: a jobs.errorlog.LastError as QMP data (time as QEMU stamps events)."""
    seconds, micro = divmod(last.time_us, 1000000)
    return {"operation": last.operation, "errno": last.errno, "desc": last.desc,
            "count": last.count, "time": {"seconds": seconds, "microseconds": micro}}


def _with_error(info: dict, state) -> dict:
    # QEMU's "error" member: present only once the job has failed.
    if state.error is not None:
        info["error"] = state.error
    return info
