"""One stable view of a job, merged from query-block-jobs and query-jobs.

QEMU describes a block job twice: BlockJobInfo (device, len, offset, speed,
io-status, ready, ...) and JobInfo (id, status, current-progress, ...).
jobctl shows and prints one record per job with a fixed set of keys, so
scripts reading `jobctl status --json` see the same shape whatever the
server left out (missing values are null).
"""

from .qmp_client import QMPError

# Every record has exactly these keys, in this order; docs/jobctl.md lists them.
JOB_KEYS = (
    "id",
    "type",
    "device",
    "status",
    "busy",
    "paused",
    "ready",
    "len",
    "offset",
    "current-progress",
    "total-progress",
    "progress",
    "speed",
    "io-status",
    "auto-finalize",
    "auto-dismiss",
    "actively-synced",
    "error",
    "x-copied-bytes",
    "x-last-error",
    "x-policies",
)

# Fields taken from BlockJobInfo and from JobInfo; where both have a value
# for the same key, BlockJobInfo's wins except for status, which JobInfo
# reports as the job state machine sees it.
_BLOCK_FIELDS = ("type", "device", "status", "busy", "paused", "ready", "len", "offset",
                 "speed", "io-status", "auto-finalize", "auto-dismiss", "actively-synced", "error",
                 "x-copied-bytes", "x-last-error", "x-policies")
_JOB_FIELDS = ("type", "status", "current-progress", "total-progress", "error")

# States after which a job does no more work (it may still await dismiss).
FINAL_STATES = ("concluded", "null")


def block_job_id(info):
    """The job id of a BlockJobInfo: QEMU names it `device` (historical)."""
    return info.get("id") or info.get("device")


def event_job_id(data):
    """The job id an event is about: `id` in JOB_* events, `device` in BLOCK_JOB_*."""
    if not isinstance(data, dict):
        return None
    return data.get("id") or data.get("device")


def merge_jobs(block_jobs, jobs):
    """Merge query-block-jobs and query-jobs results into stable records.

    Either list may be None (command unavailable). Order: block jobs in the
    server's order, then jobs only query-jobs knows about.
    """
    records = {}
    for info in block_jobs or ():
        job_id = block_job_id(info)
        record = records.setdefault(job_id, _empty_record(job_id))
        for key in _BLOCK_FIELDS:
            if info.get(key) is not None:
                record[key] = info[key]
    for info in jobs or ():
        job_id = info.get("id")
        record = records.setdefault(job_id, _empty_record(job_id))
        for key in _JOB_FIELDS:
            if info.get(key) is None:
                continue
            if key == "status" or record[key] is None:
                record[key] = info[key]
    for record in records.values():
        record["progress"] = progress_fraction(record)
    return list(records.values())


def progress_fraction(record):
    """Return done/total in 0..1, or None when the job has no known size."""
    for done_key, total_key in (("offset", "len"), ("current-progress", "total-progress")):
        done, total = record.get(done_key), record.get(total_key)
        if done is not None and total:
            return max(0.0, min(1.0, done / total))
    return None


def done_and_total(record):
    """Return (bytes done, bytes total) from whichever source has them."""
    if record.get("len"):
        return record.get("offset") or 0, record["len"]
    if record.get("total-progress"):
        return record.get("current-progress") or 0, record["total-progress"]
    return None, None


def fetch_jobs(client):
    """Ask the server for all jobs and return merged records.

    A server without query-jobs (or without query-block-jobs) still works:
    the missing half is left null.
    """
    block_jobs = _query_optional(client, "query-block-jobs")
    jobs = _query_optional(client, "query-jobs")
    return merge_jobs(block_jobs, jobs)


def find_job(records, job_id):
    """Return the record with this id, or None."""
    for record in records:
        if record["id"] == job_id:
            return record
    return None


def _query_optional(client, command):
    try:
        return client.execute(command)
    except QMPError as e:
        if e.cls == "CommandNotFound":
            return None
        raise


def _empty_record(job_id):
    record = dict.fromkeys(JOB_KEYS)
    record["id"] = job_id
    return record
