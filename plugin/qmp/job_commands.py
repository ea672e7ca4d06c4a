"""QMP commands that drive jobs: queries and the verbs, with QEMU's schemas.

Handlers only look a job up in the :class:`~plugin.jobs.registry.JobRegistry` and
call the matching ``Job.user_*`` verb; every rule (verb table, error texts)
lives in :mod:`plugin.jobs.engine` and :mod:`plugin.jobs.states`; the query
replies are shaped in :mod:`plugin.qmp.job_info`.  As in QEMU, the ``device``
argument of the block-job-* commands is the job id; block-job-* lookups fail
with DeviceNotActive "Block job 'X' not found", job-* lookups with
GenericError "Job not found".
"""

from __future__ import annotations

from ..core import policy
from ..core.errors import CommandError
from .job_info import block_job_info, job_info

# QEMU's JobType (block-job-change's optional, deprecated discriminator).
JOB_TYPES = ["commit", "stream", "mirror", "backup", "create", "amend",
             "snapshot-load", "snapshot-save", "snapshot-delete"]
COPY_MODES = ["background", "write-blocking"]

_CHANGE_OPTIONS = ("copy-mode", "on-source-error", "on-target-error", "on-error")


def register_job_commands(registry, jobs) -> None:
    """Register the job queries and verbs of ``jobs`` (a JobRegistry) in ``registry``."""

    def query_block_jobs():
        return [block_job_info(job) for job in jobs.jobs()]

    def query_jobs():
        return [job_info(job) for job in jobs.jobs()]

    def block_job_set_speed(device, speed):
        jobs.find_block_job(device).user_set_speed(speed)

    def block_job_cancel(device, force=False):
        job = jobs.find_block_job(device)
        if job.user_paused and not force:
            raise CommandError(f"The block job for device '{device}' is currently paused")
        job.user_cancel(force)

    def block_job_change(id, type=None, **options):  # noqa: A002 (QMP names)
        change(jobs.find_block_job(id), type, options)

    def job_change(id, type=None, **options):  # noqa: A002 (QMP names)
        # QEMU 9.2's name for block-job-change: the same arguments, a job-* lookup.
        change(jobs.find(id), type, options)

    def change(job, type, options):  # noqa: A002 (QMP names)
        if type is not None and type != job.type:
            raise CommandError(f"Job '{job.id}' is '{job.type}' job, not '{type}'")
        job.user_change(**{name.replace("-", "_"): value for name, value in options.items()})

    def block_verb(method):
        return lambda device: getattr(jobs.find_block_job(device), method)()

    def block_verb_by_id(method):
        return lambda id: getattr(jobs.find_block_job(id), method)()

    def job_verb(method):
        return lambda id: getattr(jobs.find(id), method)()

    registry.register("query-block-jobs", query_block_jobs)
    registry.register("query-jobs", query_jobs)

    registry.register("block-job-set-speed", block_job_set_speed,
                      {"device": "str", "speed": "int"})
    registry.register("block-job-cancel", block_job_cancel,
                      {"device": "str", "*force": "bool"})
    registry.register("block-job-pause", block_verb("user_pause"), {"device": "str"})
    registry.register("block-job-resume", block_verb("user_resume"), {"device": "str"})
    registry.register("block-job-complete", block_verb("user_complete"), {"device": "str"})
    registry.register("block-job-finalize", block_verb_by_id("user_finalize"), {"id": "str"})
    registry.register("block-job-dismiss", block_verb_by_id("user_dismiss"), {"id": "str"})
    change_schema = {"id": "str", "*type": JOB_TYPES, "*copy-mode": COPY_MODES}
    for name in _CHANGE_OPTIONS[1:]:
        change_schema["*" + name] = list(policy.POLICIES)
    registry.register("block-job-change", block_job_change, change_schema)
    registry.register("job-change", job_change, change_schema)

    registry.register("job-pause", job_verb("user_pause"), {"id": "str"})
    registry.register("job-resume", job_verb("user_resume"), {"id": "str"})
    # job-cancel always forces, as in QEMU.
    registry.register("job-cancel", lambda id: jobs.find(id).user_cancel(True), {"id": "str"})
    registry.register("job-complete", job_verb("user_complete"), {"id": "str"})
    registry.register("job-finalize", job_verb("user_finalize"), {"id": "str"})
    registry.register("job-dismiss", job_verb("user_dismiss"), {"id": "str"})
