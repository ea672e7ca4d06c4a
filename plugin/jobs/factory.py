"""Building jobs: one path for drive-mirror, block-stream, block-commit and restore after restart.

A JobContext carries what a job needs from the composition root (the disk,
the event bus, the registry, the job records, the pivot, the base).  start_mirror(),
start_stream() and start_commit() build a new job from its settings (the QMP
handlers in plugin/qmp/ check the arguments first); restore_all()
brings back every job the state directory holds (plugin/jobs/record.py).

Launch order, for a crash at any point between two steps:

1. JobRegistry.add (id and device checks; JOB_STATUS_CHANGE created);
   a commit's base check loosened in meta.json (its size only: the job
   will change the bytes it samples; plugin/jobs/commit.py);
2. a mirror's or commit's intent log, every region set, fdatasync()ed;
3. the job record (atomic replace): from here a restart brings the job back;
4. attach: the intent guard and the dirty-bitmap listener, clients quiesced;
5. start (JOB_STATUS_CHANGE running; paused if it comes back paused).
"""

import logging
import os
import time

from ..core.errors import CommandError
from ..blockcopy.intent import IntentLog, region_size_for
from .backup import BackupJob
from .commit import CommitJob
from .mirror import MirrorJob
from .record import RecordError
from .stream import StreamJob

log = logging.getLogger(__name__)


class JobContext:
    """What a job needs from the server.

    records: JobRecords, or None (jobs live only in the process); pivot(address):
    serve the mirror target from now on; active_target: () -> the pivot target
    meta.json names, or None; reconnect_delay: the plugin's (a target's default);
    open_base(address): a new read-only backend of the base (a commit's complete).
    """

    def __init__(self, disk, bus, jobs, records=None, pivot=None, active_target=None,
                 reconnect_delay=0.0, exports=None, open_base=None):
        self.disk = disk
        self.bus = bus
        self.jobs = jobs               # JobRegistry
        self.records = records
        self.pivot = pivot
        self.active_target = active_target
        self.reconnect_delay = reconnect_delay
        self.exports = exports         # a pull-mode backup's view export (plugin/exports.py)
        self.open_base = open_base


def start_mirror(ctx, settings, connect_wait=None):
    """A new mirror from checked settings (record spelling: 'buf-size', 'on-target-error').

    connect_wait: wait up to that long for the target connection (the QMP
    command's thread), so a target that refuses at once is an error of the
    command and no job exists; a slower one is waited for by the job.
    """
    job = _mirror(ctx, settings, intent=None, restored=False)
    job.hold_bitmap()
    _connect_within(job, connect_wait)
    _launch(ctx, job)
    return job


def _connect_within(job, connect_wait):
    """Wait up to connect_wait for a new job's target (None: not at all); a target
    that refuses (or has another size) ends the job before it exists."""
    if connect_wait is None:
        return
    try:
        job.open_target_within(connect_wait)
    except (OSError, CommandError):
        job.clean()
        raise


def start_stream(ctx, settings):
    job = _stream(ctx, settings)
    _launch(ctx, job)
    return job


def start_commit(ctx, settings, connect_wait=None):
    """A new commit into the disk's base (settings["target"]); connect_wait as
    start_mirror's: a base that refuses writes is an error of the command."""
    job = _commit(ctx, settings, intent=None, restored=False)
    _connect_within(job, connect_wait)
    _launch(ctx, job)
    return job


def _mirror(ctx, s, intent, restored):
    return MirrorJob(
        s["id"], ctx.bus, ctx.disk, s["target"], sync=s.get("sync", "full"),
        granularity=s.get("granularity") or None, buf_size=s.get("buf-size") or None,
        speed=s.get("speed", 0), on_source_error=s.get("on-source-error", "report"),
        on_target_error=s.get("on-target-error", "report"),
        copy_mode=s.get("copy-mode", "background"),
        auto_finalize=s.get("auto-finalize", True), auto_dismiss=s.get("auto-dismiss", True),
        pivot=ctx.pivot, intent=intent, restored=restored,
        reconnect_delay=s.get("reconnect-delay", ctx.reconnect_delay),
        target_instance=s.get("target-instance") if restored else None,
        bitmap=s.get("bitmap"), target_is_zero=s.get("target-is-zero", False))


def start_backup(ctx, settings, connect_wait=None):
    """A new backup from checked settings; like start_mirror (connect_wait)."""
    job = prepare_backup(ctx, settings, connect_wait)
    _launch(ctx, job)
    return job


def prepare_backup(ctx, settings, connect_wait=None):
    """A backup built and connected but not launched (a `transaction` launches it
    with launch() once every action is prepared, or drops it with job.clean())."""
    job = _backup(ctx, settings, restored=False)
    if job.export is None:                 # pull mode: no target to connect to
        _connect_within(job, connect_wait)
    return job


def launch(ctx, job):
    _launch(ctx, job)


def _backup_files(ctx, job_id):
    if ctx.records is not None:
        return ctx.records.backup_path(job_id)
    import tempfile
    return os.path.join(tempfile.mkdtemp(prefix="overlay-backup-"), job_id)


def _backup(ctx, s, restored):
    return BackupJob(
        s["id"], ctx.bus, ctx.disk, s["target"], _backup_files(ctx, s["id"]),
        sync=s.get("sync", "full"), granularity=s.get("granularity") or None,
        buf_size=s.get("buf-size") or None, speed=s.get("speed", 0),
        on_source_error=s.get("on-source-error", "report"),
        on_target_error=s.get("on-target-error", "report"),
        on_cbw_error=s.get("on-cbw-error", "break-guest-write"),
        auto_finalize=s.get("auto-finalize", True), auto_dismiss=s.get("auto-dismiss", True),
        reconnect_delay=s.get("reconnect-delay", ctx.reconnect_delay), restored=restored,
        max_chunk=s.get("max-chunk"), exports=ctx.exports, bitmap=s.get("bitmap"),
        bitmap_mode=s.get("bitmap-mode"),
        target_instance=s.get("target-instance") if restored else None)


def _commit(ctx, s, intent, restored):
    return CommitJob(
        s["id"], ctx.bus, ctx.disk, s["target"], speed=s.get("speed", 0),
        on_error=s.get("on-error", "report"), auto_finalize=s.get("auto-finalize", True),
        auto_dismiss=s.get("auto-dismiss", True), open_base=ctx.open_base,
        buf_size=s.get("buf-size") or None, intent=intent, restored=restored,
        reconnect_delay=s.get("reconnect-delay", ctx.reconnect_delay),
        target_instance=s.get("target-instance") if restored else None)


def _stream(ctx, s):
    return StreamJob(
        s["id"], ctx.bus, ctx.disk, on_error=s.get("on-error", "report"),
        speed=s.get("speed", 0), auto_finalize=s.get("auto-finalize", True),
        auto_dismiss=s.get("auto-dismiss", True))


def _launch(ctx, job):
    try:
        ctx.jobs.add(job)
    except CommandError:
        job.clean()
        raise
    if isinstance(job, CommitJob):
        try:
            job.loosen_base_check()
        except OSError as e:
            job.shutdown()
            raise CommandError("Cannot update %s: %s" % (ctx.disk.store.state.path,
                                                         e.strerror or e)) from None
    if ctx.records is not None:
        try:
            if isinstance(job, _COPYING):
                job.intent = IntentLog(ctx.records.intent_path(job.id), ctx.disk.size,
                                       region_size_for(ctx.disk.size, job.granularity),
                                       create=True)
            job.created = time.time()
            job.durable = ctx.records
            ctx.records.save(job)
        except OSError as e:
            job.durable = None
            ctx.records.forget_id(job.id)
            job.shutdown()
            raise CommandError("Cannot save the job record in %s: %s"
                               % (ctx.records.state.path, e.strerror or e)) from None
    if isinstance(job, _ATTACHED):
        job.attach()
    job.start()


# Jobs with an intent log and a client-write listener (attach()); a backup attaches
# its copy-before-write guard (its point in time) instead.
_COPYING = (MirrorJob, CommitJob)
_ATTACHED = _COPYING + (BackupJob,)


def restore_all(ctx, saved, pause=False):
    """Bring back every saved job (before the control socket accepts clients).

    pause: job-restart=pause, every job comes back user-paused.  Returns the
    jobs restored.  A job whose work had finished before the stop (a mirror
    whose pivot meta.json records, a stream whose base is gone) is dropped.
    """
    restored = []
    for rec in saved:
        job = _restore_one(ctx, rec, pause)
        if job is not None:
            restored.append(job)
    return restored


def _restore_one(ctx, rec, pause):
    job_id, kind = rec["id"], rec["type"]
    if kind == "mirror" and ctx.active_target is not None and \
            ctx.active_target() == rec.get("target"):
        log.info("Job record dropped job=%s: the mirror had pivoted to %s before the stop",
                 job_id, rec.get("target"))
        ctx.records.forget_id(job_id)
        return None
    if kind == "stream" and not getattr(ctx.disk.store, "has_base", False):
        log.info("Job record dropped job=%s: the stream had finished (no base) before the stop",
                 job_id)
        ctx.records.forget_id(job_id)
        return None
    if kind == "commit" and _commit_done(ctx, rec):
        ctx.records.forget_id(job_id)
        return None
    try:
        if kind in ("mirror", "commit"):
            path = ctx.records.intent_path(job_id)
            granularity = rec.get("granularity") or ctx.disk.store.cluster_size
            region = rec.get("region-size") or region_size_for(ctx.disk.size, granularity)
            exists = os.path.exists(path)
            if not exists:
                log.warning("Mirror intent log missing job=%s: every region counts as dirty",
                            job_id)
            intent = IntentLog(path, ctx.disk.size, region, create=not exists)
            build = _mirror if kind == "mirror" else _commit
            job = build(ctx, rec, intent, restored=True)
            if kind == "mirror":
                job.hold_bitmap()
        elif kind == "backup":
            if not os.path.exists(ctx.records.backup_path(job_id) + ".needed"):
                log.warning("Job record dropped job=%s: the backup's point in time was never "
                            "taken (a crash before it started)", job_id)
                ctx.records.forget_id(job_id)
                return None
            job = _backup(ctx, rec, restored=True)
        else:
            job = _stream(ctx, rec)
    except (CommandError, ValueError, KeyError, TypeError) as e:
        raise RecordError("job record %s cannot be restored: %s"
                          % (ctx.records.path(job_id), e)) from None
    job.created = rec.get("created")
    job.restore_state(paused=rec["paused"] or pause, io_status=rec["io-status"],
                      offset=rec["offset"], total=rec["len"],
                      ready_seen=bool(rec.get("ready-seen")))
    ctx.jobs.add(job)
    job.durable = ctx.records
    if isinstance(job, CommitJob):
        try:
            job.loosen_base_check()
        except OSError as e:
            raise RecordError("job record %s: cannot update meta.json: %s"
                              % (ctx.records.path(job_id), e.strerror or e)) from None
    if isinstance(job, _ATTACHED):
        job.attach()
    ctx.records.save(job)
    job.start()
    after = "shutdown" if rec.get("shutdown") else "crash"
    status = "paused" if (rec["paused"] or pause) else "running"
    info = {"id": job_id, "type": kind, "status": status, "after": after,
            "io-status": rec["io-status"], "ready-seen": bool(rec.get("ready-seen")),
            "offset": rec["offset"], "len": rec["len"]}
    if isinstance(job, _COPYING):
        info["dirty"] = job.bitmap.dirty_bytes()
    log.info("Job recovered job=%s type=%s after=%s status=%s offset=%d len=%d%s", job_id, kind,
             after, status, rec["offset"], rec["len"],
             " dirty=%d" % info["dirty"] if "dirty" in info else "")
    ctx.bus.emit("JOB_RECOVERED", info)
    return job


def _commit_done(ctx, rec):
    """True if a commit's record needs no job: its complete emptied the overlay
    before the stop (the record was saved "completing" first), or the disk has
    no base to commit into any more.  A base other than the record's is an error."""
    store = ctx.disk.store
    base = getattr(store, "base_address", None) if getattr(store, "has_base", False) else None
    if base is None:
        log.info("Job record dropped job=%s: the disk has no base to commit into", rec["id"])
        return True
    if rec.get("target") != base:
        raise RecordError("job record %s commits into %s, but the disk's base is %s"
                          % (ctx.records.path(rec["id"]), rec.get("target"), base))
    if rec.get("completing") and store.absent_bytes() == ctx.disk.size:
        log.info("Job record dropped job=%s: the commit had emptied the overlay before the stop",
                 rec["id"])
        return True
    return False
