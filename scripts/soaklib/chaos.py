"""Faults: the disk's nbdkit killed or stopped, its base and the job's target killed,
stopped or failing, junk and abrupt closes on the control socket.

A fault that may fail the job is noted on it (JobTrack.faulted): a job that fails with
no fault in its way is a violation.  A fault that may hold client requests says how long
(soak.allow), so the latency bound of the step grows by that much.
"""

import os
import signal
import socket
import struct
import time

from qmp_fuzz import messages

from .core import SIGTERM_BOUND, Skip, Violation
from .registry import op
from .rig import RECONNECT_DELAY


def _restart(soak, how):
    t0 = time.monotonic()
    soak.rig.restart()
    soak.restarted(how)
    return time.monotonic() - t0


@op(2)
def kill9(soak, rnd):
    time.sleep(rnd.uniform(0, 0.5))          # a random moment of whatever runs
    soak.rig.kill9()
    time.sleep(rnd.uniform(0, 0.3))
    return "kill -9 the disk's nbdkit; restarted in %.2fs" % _restart(soak, "kill -9")


@op(1)
def kill9_in_complete(soak, rnd):
    """complete a ready mirror, then kill -9 within its final copy and pivot: after the
    restart it is served wholly from the overlay (the job is back) or from the target
    (the pivot was committed), and every acknowledged byte is there (docs/jobs.md)."""
    job, info = soak.ready_job(("mirror",))
    if info["paused"]:
        raise Skip("%s is paused" % job.id)
    ok, why = soak.try_qmp("block-job-complete", {"device": job.id})
    if not ok:
        return "complete %s refused: %s" % (job.id, why)
    job.complete_asked = True
    job.faulted.append("kill -9 in complete")
    time.sleep(rnd.uniform(0, 0.15))
    soak.rig.kill9()
    took = _restart(soak, "kill -9")
    return "complete %s, kill -9 meanwhile; restarted in %.2fs: %s" % (
        job.id, took, "the job is back" if soak.job is job else "pivoted" if soak.store is
        job.target else "the job ended: %s" % job.outcome)


@op(1)
def sigterm(soak, rnd):
    time.sleep(rnd.uniform(0, 0.5))
    took = soak.rig.sigterm(SIGTERM_BOUND)
    if took is None:
        dump = soak.rig.dump_stuck("no exit within %.0fs of SIGTERM" % SIGTERM_BOUND)
        raise Violation("nbdkit did not exit within %.0fs of SIGTERM (its threads: %s)"
                        % (SIGTERM_BOUND, dump))
    soak.maxima["sigterm exit s"] = max(soak.maxima["sigterm exit s"], took)
    return "SIGTERM: exited in %.2fs; restarted in %.2fs" % (took, _restart(soak, "SIGTERM"))


def _job_target(soak):
    job = soak.job
    if job is None or job.target is None or not job.target.served or job.target.protected:
        raise Skip("no job with a served target")
    return job, job.target


@op(1)
def target_kill(soak, rnd):
    job, target = _job_target(soak)
    job.faulted.append("target killed")
    target.kill9()
    down = rnd.uniform(0, 2.5)
    time.sleep(down)
    target.restart()
    return "kill -9 %r, back after %.2fs" % (target, down)


@op(2)
def target_stop(soak, rnd):
    """SIGSTOP the target for a while; sometimes force-cancel the job meanwhile (issue 24:
    a write-blocking mirror's clients must go on at once)."""
    job, target = _job_target(soak)
    stopped = rnd.uniform(0.2, 3.0)
    cancel = rnd.random() < 0.35
    soak.allow(stopped + 1)                  # a backup's copy-before-write waits for it
    job.faulted.append("target stopped")
    target.stop()
    try:
        time.sleep(stopped / 2)
        what = " forced cancel meanwhile: " + soak.forced_cancel() if cancel else ""
        time.sleep(stopped / 2)
    finally:
        target.cont()
    return "SIGSTOP %r for %.2fs%s" % (target, stopped, what)


@op(2)
def target_error(soak, rnd):
    job, target = _job_target(soak)
    seconds = rnd.uniform(0.2, 3.0)
    job.faulted.append("target " + target.errno)
    target.switch.on()
    try:
        time.sleep(seconds)
    finally:
        target.switch.off()
    return "%r fails writes with %s for %.2fs" % (target, target.errno, seconds)


@op(1)
def link_down(soak, rnd):
    """The link to a target in another network namespace goes down (no RST: the TCP
    connection stalls), then comes back; TCP's retransmission back-off may add as much
    again before the stalled requests move."""
    job, target = _job_target(soak)
    if target.kind != "far":
        raise Skip("the job's target is not across a link")
    seconds = rnd.uniform(0.5, 4.0)
    soak.allow(2 * seconds + 1)
    job.faulted.append("link down")
    netns = soak.rig.netns()
    netns.link_down()
    try:
        time.sleep(seconds)
    finally:
        netns.link_up()
    return "the link to %r down for %.2fs" % (target, seconds)


@op(1)
def overlay_full(soak, rnd):
    """The state directory's filesystem fills up for a while: client changes that need
    new space fail with ENOSPC (werror=report), the rest goes on; jobs and bitmaps that
    need space meet ENOSPC too (a job may fail of it)."""
    fs = soak.rig.fs
    if fs is None:
        raise Skip("no tmpfs for the state directory")
    seconds = rnd.uniform(0.3, 2.5)
    if soak.job is not None:
        soak.job.faulted.append("overlay full")
    filler = fs / "filler"
    t0 = time.monotonic()
    _fill(filler)
    try:
        time.sleep(seconds)
    finally:
        os.unlink(filler)
        soak.allow_errors(t0, time.monotonic() + 0.1, "ENOSPC")
    return "the overlay's filesystem full for %.2fs" % seconds


def _fill(path):
    """A file that takes every free block of its filesystem."""
    with open(path, "wb") as f:
        size = 0
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    os.posix_fallocate(f.fileno(), size, chunk)
                    size += chunk
            except OSError:
                pass


def _base(soak):
    if soak.base_gone or soak.store is not None:
        raise Skip("the disk has no base")
    return soak.rig.base_server


@op(1)
def base_kill(soak, rnd):
    """Within reconnect-delay a lost base is invisible (docs/overlay.md)."""
    base = _base(soak)
    down = rnd.uniform(0, RECONNECT_DELAY / 2)
    soak.allow(RECONNECT_DELAY + 1)
    base.kill9()
    time.sleep(down)
    soak.rig.base_server = soak.rig.servers.restart(base)
    return "kill -9 the base's nbdkit, back after %.2fs" % down


@op(1)
def base_stop(soak, rnd):
    base = _base(soak)
    stopped = rnd.uniform(0.2, 2.0)
    soak.allow(stopped + 1)
    os.kill(base.pid, signal.SIGSTOP)
    try:
        time.sleep(stopped)
    finally:
        os.kill(base.pid, signal.SIGCONT)
    return "SIGSTOP the base's nbdkit for %.2fs" % stopped


@op(1)
def control_junk(soak, rnd):
    """Fuzzed messages (tests/qmp_fuzz.py: nothing that starts a job or changes the disk)
    on a few raw control connections, some closed abruptly mid-message."""
    sent = 0
    for _ in range(rnd.randint(1, 3)):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        try:
            s.connect(str(soak.rig.ctl))
            if rnd.random() < 0.7:
                s.sendall(b'{"execute": "qmp_capabilities"}')
            for msg in messages(rnd.getrandbits(32), rnd.randint(10, 200)):
                s.sendall(msg)
                sent += 1
                _drain(s)
            if rnd.random() < 0.5:
                s.sendall(b'{"execute": "query-block-jobs", "argum')     # cut short
            if rnd.random() < 0.5:                                       # RST, not FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass                          # the server may close on us: that is its right
        finally:
            s.close()
    return "%d junk messages" % sent


def _drain(s):
    """Read what the server answered so far (it stops reading a client that does not)."""
    s.settimeout(0)
    try:
        while s.recv(1 << 20):
            pass
    except (BlockingIOError, InterruptedError):
        pass
    finally:
        s.settimeout(2)
