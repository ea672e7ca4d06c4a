"""Section "backup", part resume: a full backup killed (kill -9) at half way and restarted.

Ours only.  A full backup to a target behind nbdkit's log filter (which
counts the bytes written), client writes during it, kill -9 of our nbdkit
once offset >= len/2, restart on the same state directory; the resumed job
runs to its end.  Bytes written to the target after the restart as a
percentage of the disk: goal <= 60%.  The target must then hold the point in
time (sha256 of the target file).  Also the sha256 helper of the section.
"""

import hashlib
import os
import random
import re
import signal
import time

import nbd
from jobctl.qmp_client import QMPClient

from benchlib.bench import human_size
from benchlib.durable import TargetCrashed, _cleanup, _target as _logged_target
from benchlib.mirror import PLUGIN, TIMEOUT
from benchlib.overlay import CHUNK
from benchlib.results import Goal
from benchlib.stream import _wait_for

SECTION = "backup"
RESUME_GOAL = Goal(60, relative=False)
CHANGE_WRITE = 64 << 10             # client writes of this size, at aligned offsets
RESUME_WRITES = 32                  # client writes during the backup that is killed

_DATA_RE = re.compile(rb"connection=\d+ (?:Write|Zero) id=\d+ offset=0x[0-9a-f]+ "
                      rb"count=0x([0-9a-f]+) ")


def _sha256(path, patches=None, block=CHANGE_WRITE):
    """sha256 of a file; patches: {offset: bytes of `block`} replacing its blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        offset = 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            if patches:
                chunk = bytearray(chunk)
                for b in range(0, len(chunk), block):
                    data = patches.get(offset + b)
                    if data is not None:
                        chunk[b:b + block] = data
            h.update(chunk)
            offset += len(chunk)
    return h.hexdigest()


def _written(log, since=0):
    """Data bytes the target's log shows written (Write and Zero) after position since."""
    with open(log, "rb") as f:
        f.seek(since)
        data = f.read()
    return sum(int(m.group(1), 16) for m in _DATA_RE.finditer(data)), since + len(data)


def resume_benchmark(bench, base, base_sha, checks):
    group = bench.group(SECTION, "resume", "bytes written to the target by a full backup "
                        "killed (kill -9) at offset >= len/2 and restarted, %% of the %s disk"
                        % human_size(bench.size), "%")
    group.row("before", "before the kill")
    group.row("after", "after the restart, until COMPLETED", goal=RESUME_GOAL)
    for i in range(bench.runs):
        bench.progress("backup resume: run %d/%d" % (i + 1, bench.runs))
        for attempt in range(3):
            try:
                before, after, same = _killed(bench, base, base_sha, seed=i)
                break
            except TargetCrashed as e:
                bench.progress("backup resume: the target nbdkit died at the kill (not ours; "
                               "round repeated, attempt %d/3):%s" % (attempt + 1, e))
        else:
            raise RuntimeError("backup resume: the target nbdkit died at the kill 3 times")
        checks.add("resume", same)
        group.add("before", 100.0 * before / bench.size)
        group.add("after", 100.0 * after / bench.size)


def _client_writes(uri, size, count, seed):
    """count synchronous 64 KiB writes at random aligned offsets (copy-before-write)."""
    rnd = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for block in rnd.sample(range(size // CHANGE_WRITE), min(count, size // CHANGE_WRITE)):
        h.pwrite(rnd.randbytes(CHANGE_WRITE), block * CHANGE_WRITE)
    h.shutdown()


def _killed(bench, base, base_sha, seed):
    """(bytes written before the kill, after the restart, the target is the point in time).

    The backup starts with a speed limit so that the client writes land while
    it is young, then runs unlimited; kill -9 once offset >= len/2.  It is
    started with auto-dismiss off, so that its end shows in query-jobs even if
    it comes before our QMP client reconnects after the restart.
    """
    path, log, target, uri = _logged_target(bench)
    state, control = bench.path("bstate"), bench.path("bctl.sock")
    args = ("python", PLUGIN, "overlay=" + state, "base=" + base, "control=" + control)
    server = bench.servers.nbdkit("overlay-resume", *args, ready=False)
    try:
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            qmp.execute("drive-backup", {"device": "disk0", "job-id": "b", "sync": "full",
                                         "target": uri, "auto-dismiss": False,
                                         "speed": max(1 << 20, bench.size // 4)})
            _client_writes(server.uri, bench.size, RESUME_WRITES, seed)
            qmp.execute("block-job-set-speed", {"device": "b", "speed": 0})
            deadline = time.monotonic() + TIMEOUT
            while True:
                job = qmp.execute("query-block-jobs")[0]
                if job["len"] and job["offset"] >= job["len"] / 2:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("backup resume: the backup did not reach 50%")
                time.sleep(0.002)
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait()
        bench.servers._running.remove(server)
        before, pos = _written(log)
        os.unlink(server.sock)
        os.unlink(control)             # stale: the restarted server makes a new one
        server = bench.servers.nbdkit("overlay-resume", *args, ready=False)
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            _client_writes(server.uri, bench.size, RESUME_WRITES // 2, seed + 1000)
            deadline = time.monotonic() + TIMEOUT
            while True:
                jobs = [j for j in qmp.execute("query-jobs") if j["id"] == "b"]
                if not jobs:
                    raise RuntimeError("backup resume: the job did not come back")
                if jobs[0]["status"] == "concluded":
                    if "error" in jobs[0]:
                        raise RuntimeError("backup resume: the job failed: %s" % jobs[0])
                    break
                if target.proc.poll() is not None:
                    bench.servers._running.remove(target)      # dead: nothing to stop
                    raise TargetCrashed(target.log_tail())
                if time.monotonic() > deadline:
                    raise RuntimeError("backup resume: not concluded within %ss" % TIMEOUT)
                time.sleep(0.01)
            qmp.execute("job-dismiss", {"id": "b"})
        after, _ = _written(log, pos)
        return before, after, _sha256(path) == base_sha
    finally:
        _cleanup(bench, server, state, target, path, log)
