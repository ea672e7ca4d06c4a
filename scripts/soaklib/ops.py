"""Operations on jobs: start a mirror, a stream, a backup (push or pull), and the verbs.

Each starts or steers at most the one job a device may run; the JobTrack's on_end says
what the job's end must show (a pivoted mirror's target is the disk, a backup's target
is the disk at its point in time).
"""

import contextlib
import time

import nbd

from .bounds import FINAL_SYNC, JOB_END_WAIT, Skip, Violation
from .core import JobTrack
from .model import BitmapModel, Mask
from .registry import op

MiB = 1 << 20
POLICIES = ("report", "stop", "ignore", "enospc")
SPEEDS = (0, 0, 32 * MiB, 64 * MiB)


def _job(soak, *kinds):
    job = soak.job
    if job is None or (kinds and job.kind not in kinds):
        raise Skip("no %s job" % "/".join(kinds or ("",)))
    return job


def _base_bytes(soak):
    with open(soak.rig.base_path, "rb") as f:
        return f.read()


def _first_difference(a, b, unit=4096):
    for i in range(0, len(a), unit):
        if a[i:i + unit] != b[i:i + unit]:
            return i
    return None


def _top_possible(soak):
    """sync=top onto a copy of the base equals the disk only while the base is under it."""
    return not soak.base_gone and soak.store is None


# -- mirror -------------------------------------------------------------------------

def _finalize_choice(rnd, args):
    """Now and then auto-finalize=false: the job then waits in pending for job-finalize."""
    if rnd.random() < 0.15:
        args["auto-finalize"] = False
    return args


@op(4)
def mirror(soak, rnd):
    if soak.job is not None:
        raise Skip("job %s runs" % soak.job.id)
    sync = rnd.choice(("full", "full", "top"))
    if sync == "top" and not _top_possible(soak):
        sync = "full"
    fill = _base_bytes(soak) if sync == "top" else (
        rnd.randbytes(soak.model.size) if rnd.random() < 0.25 else None)
    target = soak.new_target(rnd, "mt", fill=fill)
    job_id = soak.name("mirror")
    args = {"device": "disk0", "job-id": job_id, "target": target.uri, "sync": sync,
            "speed": rnd.choice(SPEEDS), "on-target-error": rnd.choice(POLICIES),
            "copy-mode": rnd.choice(("background", "write-blocking")),
            "granularity": rnd.choice((65536, 65536, MiB))}
    _finalize_choice(rnd, args)
    track = JobTrack(job_id, "mirror", target, sync=sync,
                     auto_finalize=args.get("auto-finalize", True))
    track.on_end = _mirror_ended
    soak.start_job(track, "drive-mirror", args)
    return "%s to %r sync=%s copy-mode=%s speed=%d on-target-error=%s" % (
        job_id, target, sync, args["copy-mode"], args["speed"], args["on-target-error"])


def _mirror_ended(soak, track):
    if track.outcome not in ("completed", "unknown"):
        return
    active = soak.rig.block()["active"]
    if active == track.target.uri:
        if track.outcome == "completed" and not track.complete_asked:
            raise Violation("%s pivoted though complete was never asked" % track)
        old, soak.store = soak.store, track.target
        track.target.protected = True     # the disk lives there now: no faults on it
        if old is not None:
            old.protected = False
            soak.retire(old)
    elif track.outcome == "completed" and track.complete_asked:
        raise Violation("%s completed after complete without pivoting (active=%s)"
                        % (track, active))


# -- stream -------------------------------------------------------------------------

@op(1)
def stream(soak, rnd):
    if not _top_possible(soak):
        raise Skip("no base to stream")
    job_id = soak.name("stream")
    args = _finalize_choice(rnd, {"device": "disk0", "job-id": job_id,
                                  "speed": rnd.choice(SPEEDS), "on-error": rnd.choice(POLICIES)})
    track = JobTrack(job_id, "stream", auto_finalize=args.get("auto-finalize", True))
    track.on_end = _stream_ended
    soak.start_job(track, "block-stream", args)
    return "%s speed=%d on-error=%s" % (job_id, args["speed"], args["on-error"])


def _stream_ended(soak, track):
    if track.outcome in ("completed", "unknown"):
        base = soak.rig.block()["base"]
        if track.outcome == "completed" and base is not None:
            raise Violation("%s completed but the disk still names a base: %s" % (track, base))
        soak.base_gone = base is None


# -- backup -------------------------------------------------------------------------

@op(4)
def backup(soak, rnd):
    """Push a point in time: full (maybe starting an incremental chain), top, incremental."""
    if soak.job is not None:
        raise Skip("job %s runs" % soak.job.id)
    sync = rnd.choice(("full", "full", "top", "incremental", "incremental"))
    if sync == "incremental" and soak.chain is None:
        sync = "full"
    if sync == "top" and not _top_possible(soak):
        sync = "full"
    fill = {"top": lambda: _base_bytes(soak), "incremental": lambda: soak.chain[1]}.get(
        sync, lambda: None)()
    target = soak.new_target(rnd, "bt", fill=fill)
    job_id = soak.name("backup")
    args = {"device": "disk0", "job-id": job_id, "target": target.uri, "sync": sync,
            "speed": rnd.choice(SPEEDS), "on-target-error": rnd.choice(POLICIES)}
    _finalize_choice(rnd, args)
    chain = sync == "full" and rnd.random() < 0.6
    track = JobTrack(job_id, "backup", target, sync=sync,
                     auto_finalize=args.get("auto-finalize", True))
    track.on_end = _backup_ended
    with soak.clients_paused():
        track.info["snapshot"] = soak.model.snapshot()
        if sync == "incremental":
            args["bitmap"] = soak.chain[0]
            soak.start_job(track, "drive-backup", args)
            bitmap = soak.model.bitmaps[soak.chain[0]]
            bitmap.frozen, bitmap.changes, bitmap.busy = bitmap.changes, Mask(soak.model.size), True
            track.info["bitmap"] = bitmap.name
            track.info["breaks"] = bitmap.breaks
        elif chain:
            name, persistent = soak.name("chain"), rnd.random() < 0.7
            soak.start_job(track, "transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": name, "persistent": persistent}},
                {"type": "drive-backup", "data": args}]})
            soak.model.bitmaps[name] = BitmapModel(name, soak.model.size, 65536, persistent, True)
            track.info["starts-chain"] = name
            track.info["breaks"] = 0
        else:
            soak.start_job(track, "drive-backup", args)
    return "%s to %r sync=%s%s speed=%d on-target-error=%s" % (
        job_id, target, sync, " bitmap=" + args["bitmap"] if "bitmap" in args else
        " (+ bitmap %s: a new chain)" % track.info["starts-chain"] if chain else "",
        args["speed"], args["on-target-error"])


def _backup_ended(soak, track):
    snapshot = track.info["snapshot"]
    equal = track.target.read() == snapshot
    if track.outcome == "completed" and not equal:
        at = _first_difference(track.target.read(), snapshot)
        raise Violation("%s completed but its target differs from the point in time at %d"
                        % (track, at))
    done = track.outcome == "completed" or (track.outcome == "unknown" and equal)
    name = track.info.get("bitmap")
    if name is not None and name in soak.model.bitmaps:
        bitmap = soak.model.bitmaps[name]
        bitmap.busy = False
        if not done and track.outcome != "unknown":
            bitmap.changes.update(bitmap.frozen)     # bitmap-mode=on-success gives it back
        bitmap.frozen = None
    chain = name or track.info.get("starts-chain")
    follows = soak.model.bitmaps.get(chain)
    # A chain follows the bitmap only if it covered every change since the backup
    # started: disabled or cleared meanwhile (the backup still running), it lacks some
    # (seed 994825607: an incremental from a bitmap disabled during the full backup
    # that started its chain copied nothing and missed the writes since).
    if (done and follows is not None and follows.recording
            and follows.breaks == track.info.get("breaks")):
        soak.chain = (chain, snapshot)
    elif track.outcome == "unknown" and name is not None:
        soak.chain = None


@op(1)
def backup_pull(soak, rnd):
    """A point in time served as export:NAME (sync=none) for the harness to read."""
    if soak.job is not None:
        raise Skip("job %s runs" % soak.job.id)
    job_id, export = soak.name("pull"), soak.name("pit")
    track = JobTrack(job_id, "backup", export=export)
    args = {"device": "disk0", "job-id": job_id, "target": "export:" + export, "sync": "none"}
    checkpoint = rnd.random() < 0.5 and len(soak.model.bitmaps) < 4
    with soak.clients_paused():
        track.info["snapshot"] = soak.model.snapshot()
        if not checkpoint:
            soak.start_job(track, "drive-backup", args)
            return "%s as export %s" % (job_id, export)
        # libvirt's checkpoint pattern (docs/backup.md): all at one instant.
        name = soak.name("cp")
        old = [b for b in soak.model.bitmaps.values() if b.recording and not b.busy][:1]
        soak.start_job(track, "transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": name, "persistent": True}}] + [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": b.name}}
            for b in old] + [{"type": "drive-backup", "data": args}]})
        soak.model.bitmaps[name] = BitmapModel(name, soak.model.size, 65536, True, True)
        for b in old:
            b.recording = False
            b.exact = soak.bitmap_extents(b.name)
            b.breaks += 1                   # as bitmaps._end_chain
            if soak.chain is not None and soak.chain[0] == b.name:
                soak.chain = None
    return "%s as export %s; checkpoint: add %s%s" % (
        job_id, export, name, "".join(", disable " + b.name for b in old))


@op(2)
def read_export(soak, rnd):
    job = _job(soak, "backup")
    export = job.info.get("export")
    if export is None:
        raise Skip("no pull-mode backup")
    snapshot = job.info["snapshot"]
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (export, soak.rig.sock))
    try:
        ranges = [(0, soak.model.size)] if rnd.random() < 0.3 else [
            (rnd.randrange(0, soak.model.size // 4096) * 4096, 65536) for _ in range(20)]
        for offset, length in ranges:
            length = min(length, soak.model.size - offset)
            got = bytes(h.pread(length, offset))
            if got != snapshot[offset:offset + length]:
                raise Violation("export %s differs from its point in time at %d+%d"
                                % (export, offset, length))
    finally:
        h.shutdown()
    return "read %d bytes of %s: the point in time" % (sum(n for _, n in ranges), export)


# -- verbs --------------------------------------------------------------------------

def _verb(soak, command, **args):
    job = _job(soak)
    ok, value = soak.try_qmp(command, dict(device=job.id, **args))
    return "%s %s" % (command, job.id) + ("" if ok else " refused: " + value)


@op(1)
def job_pause(soak, rnd):
    return _verb(soak, "block-job-pause")


@op(2)
def job_resume(soak, rnd):
    return _verb(soak, "block-job-resume")


@op(1)
def job_set_speed(soak, rnd):
    return _verb(soak, "block-job-set-speed", speed=rnd.choice(SPEEDS))


@op(1)
def job_change(soak, rnd):
    job = _job(soak)
    options = {"mirror": [("copy-mode", "write-blocking"), ("on-target-error", None)],
               "stream": [("on-error", None)], "commit": [("on-error", None)],
               "backup": [("on-target-error", None), ("on-source-error", None)]}
    name, value = rnd.choice(options[job.kind])
    args = {"id": job.id, name: value or rnd.choice(POLICIES)}
    ok, why = soak.try_qmp("block-job-change", args)
    return "block-job-change %s %s=%s" % (job.id, name, args[name]) + ("" if ok else " refused: " + why)


@op(2)
def job_complete(soak, rnd):
    """Complete a ready mirror, the clients writing on or paused; once it pivoted, the
    checks compare its target with the model (every later change goes there).  A commit
    is completed with the clients paused: then its base must equal the disk."""
    job, info = soak.ready_job(("mirror", "commit"))
    if info["paused"]:
        ok, why = soak.try_qmp("block-job-complete", {"device": job.id})
        job.complete_asked = job.complete_asked or ok
        return "complete %s (paused: it goes on after a resume)%s" % (job.id, "" if ok else why)
    soak.allow(FINAL_SYNC)                # the final copy holds the clients (docs/errors.md)
    paused = job.kind == "commit" or rnd.random() < 0.5
    job.info["complete-paused"] = paused
    t0 = time.monotonic()
    with soak.clients_paused() if paused else contextlib.nullcontext():
        ok, why = soak.try_qmp("block-job-complete", {"device": job.id})
        if not ok:
            return "complete %s refused: %s" % (job.id, why)
        job.complete_asked = True
        if not soak.wait_end(JOB_END_WAIT):
            raise Violation("%s did not end within %ds of complete" % (job, JOB_END_WAIT))
    return "complete %s%s: %s in %.2fs" % (job.id, " (clients paused)" if paused else "",
                                          job.outcome, time.monotonic() - t0)


@op(2)
def job_cancel(soak, rnd):
    job = _job(soak)
    info = soak.job_info()
    if job.kind == "mirror" and info and info["ready"] and not info["paused"] and rnd.random() < 0.5:
        with soak.clients_paused():       # soft: the target is the disk when it ends
            ok, why = soak.try_qmp("block-job-cancel", {"device": job.id, "force": False})
            if not ok:
                return "soft cancel %s refused: %s" % (job.id, why)
            job.soft_cancel_asked = True
            if not soak.wait_end(JOB_END_WAIT):
                raise Violation("%s did not end within %ds of a soft cancel" % (job, JOB_END_WAIT))
            if job.outcome == "completed" and job.target.read() != soak.model.snapshot():
                raise Violation("%s ended by a soft cancel, but its target differs from the "
                                "disk" % job)
        return "soft cancel %s: %s" % (job.id, job.outcome)
    return "forced cancel %s: %s" % (job.id, soak.forced_cancel())


@op(1)
def job_finalize(soak, rnd):
    """job-finalize a job that waits in pending (auto-finalize=false)."""
    job = _job(soak)
    info = soak.job_info()
    if info is None or info["status"] != "pending":
        raise Skip("%s is not pending" % job.id)
    ok, why = soak.try_qmp("job-finalize", {"id": job.id})
    soak.settle()
    return "job-finalize %s%s" % (job.id, "" if ok else " refused: " + why)


@op(2)
def job_wait(soak, rnd):
    """Let the job run: until it is ready or ends, or 15 s."""
    job = _job(soak)
    if job.info.get("export"):
        raise Skip("a pull-mode backup runs until cancelled")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        soak.settle()
        if soak.job is None:
            return "%s ended: %s" % (job.id, job.outcome)
        info = soak.job_info()
        if info is None or info["ready"] or info["paused"]:
            return "%s %s" % (job.id, "ready" if info and info["ready"] else "paused")
        time.sleep(0.1)
    return "%s still running" % job.id


@op(1)
def fresh_disk(soak, rnd):
    """A new disk over the base once the base is gone (a stream) or the disk moved (a
    pivot), so that a long soak keeps meeting the base-side operations."""
    if _top_possible(soak):
        raise Skip("the disk still has its base")
    soak.fresh_disk()
    return "a new state directory over the base: %s" % soak.rig.state.name


@op(1)
def commit(soak, rnd):
    """block-commit (docs/commit.md, on its own branch for now): the overlay written back
    into the base; skipped while the server has no such command."""
    if not _top_possible(soak):
        raise Skip("the disk has no base")
    if soak.job is not None:
        raise Skip("job %s runs" % soak.job.id)
    job_id = soak.name("commit")
    args = _finalize_choice(rnd, {"device": "disk0", "job-id": job_id,
                                  "speed": rnd.choice(SPEEDS), "on-error": rnd.choice(POLICIES)})
    track = JobTrack(job_id, "commit", auto_finalize=args.get("auto-finalize", True))
    track.on_end = _commit_ended
    ok, why = soak.try_qmp("query-commands")
    if ok and "block-commit" not in {c["name"] for c in why}:
        raise Skip("the server has no block-commit")
    soak.start_job(track, "block-commit", args)
    return "%s speed=%d on-error=%s" % (job_id, args["speed"], args["on-error"])


def _commit_ended(soak, track):
    """A completed commit, completed with the clients paused: the base is the disk."""
    if track.outcome == "completed" and track.info.get("complete-paused"):
        if _base_bytes(soak) != soak.model.snapshot():
            at = _first_difference(_base_bytes(soak), soak.model.snapshot())
            raise Violation("%s completed but the base differs from the disk at %d"
                            % (track, at))


@op(3)
def wait(soak, rnd):
    seconds = rnd.uniform(0.1, 1.5)
    time.sleep(seconds)
    return "%.2fs" % seconds
