"""Section "durable": a mirror that outlives the process (docs/jobs.md), and what it costs.

restart: a random --size disk mirrored (sync=full, no speed limit) to a fresh
sparse raw file served by `nbdkit --filter=log file` (its log counts the
bytes written).  The anchor is a fresh mirror until BLOCK_JOB_READY; the
measured row mirrors until offset >= len/2, kills nbdkit with SIGKILL,
starts it again on the same state directory and waits for BLOCK_JOB_READY
of the recovered job.  Two tables: bytes written to the target after the
restart (goal <= 0.6 of the fresh mirror's), and seconds from the restart
(exec of nbdkit) to READY (goal <= 0.6x the fresh mirror's seconds to READY).

cost: client 4 KiB writes at random offsets for a fixed count, at queue
depth 1 and 16 (libnbd aio), while a background mirror is in READY, on this
code and on the code before durable jobs (git revision $OVERLAY_BENCH_BEFORE,
default BEFORE below, exported with `git archive`).  Shown as microseconds
per write (1e6 / IOPS); goal: at most 1.11x the old code's, i.e. the
persistence costs at most 10% of the IOPS.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import time

import nbd
from jobctl.qmp_client import QMPClient

from benchlib.bench import REPO, human_size
from benchlib.mirror import TIMEOUT, _until_ready, _cancel
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.stream import _wait_for

TITLE = "a mirror killed half way and resumed; client write cost of the job records"
SECTION = "durable"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
BEFORE = "337ce73"          # main just before durable jobs (issue 10)
RESTART_GOAL = Goal(0.6)
COST_GOAL = Goal(1.11)
WRITES = 4000

_WRITE_RE = re.compile(rb"connection=\d+ Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+) ")


def run(bench):
    size = bench.size
    copied = bench.group(SECTION, "recopy", "bytes written to the target: fresh mirror vs after a "
                         "kill -9 at 50%% and restart (%s disk)" % human_size(size), "MiB")
    copied.row("fresh", "fresh mirror, until READY", anchor=True)
    copied.row("restart", "after the restart, until READY", goal=RESTART_GOAL)
    ready = bench.group(SECTION, "ready", "seconds to READY: fresh mirror vs from the restart "
                        "(nbdkit exec) of a mirror killed at 50%", "s")
    ready.row("fresh", "fresh mirror, drive-mirror to READY", anchor=True)
    ready.row("restart", "restart to READY of the recovered job", goal=RESTART_GOAL)
    base = make_base(bench)
    for i in range(bench.runs + 1):
        bench.progress("durable: %s" % ("warm-up round" if i == 0 else
                                        "run %d/%d" % (i, bench.runs)))
        for key in rotated(["fresh", "restart"], i):
            seconds, written = (_fresh if key == "fresh" else _killed)(bench, base)
            if i > 0:
                ready.add(key, seconds)
                copied.add(key, written / (1 << 20))
    cost_benchmark(bench, base)


def _target(bench):
    path, log = bench.path("dtarget.img"), bench.path("dtarget.log")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    server = bench.servers.nbdkit("target", "--filter=log", "file", path, "logfile=" + log)
    return path, log, server


def _written(log, since=0):
    with open(log, "rb") as f:
        f.seek(since)
        data = f.read()
    return sum(int(m.group(1), 16) for m in _WRITE_RE.finditer(data)), since + len(data)


def _start(bench, plugin, base, state, control, name="overlay-durable"):
    server = bench.servers.nbdkit(name, "python", plugin, "overlay=" + state,
                                  "base=" + base, "control=" + control)
    _wait_for(control, server)
    return server


def _cleanup(bench, server, state, target, path, log):
    for s in (server, target):
        if s is not None and s in bench.servers._running:
            bench.servers.stop(s)
    shutil.rmtree(state, ignore_errors=True)
    for p in (path, log):
        if os.path.exists(p):
            os.unlink(p)


def _fresh(bench, base):
    path, log, target = _target(bench)
    state, control = bench.path("dstate"), bench.path("dctl.sock")
    server = _start(bench, PLUGIN, base, state, control)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            seconds = _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": target.uri,
                                                        "sync": "full"})
            written, _ = _written(log)
            _cancel(qmp, "disk0")
        return seconds, written
    finally:
        _cleanup(bench, server, state, target, path, log)


def _killed(bench, base):
    path, log, target = _target(bench)
    state, control = bench.path("dstate"), bench.path("dctl.sock")
    server = _start(bench, PLUGIN, base, state, control)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            qmp.execute("drive-mirror", {"device": "disk0", "target": target.uri, "sync": "full"})
            deadline = time.monotonic() + TIMEOUT
            while True:
                job = qmp.execute("query-block-jobs")[0]
                if job["len"] and job["offset"] >= job["len"] / 2 and job["len"] >= bench.size / 2:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("durable: the mirror did not reach 50%")
                time.sleep(0.005)
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait()
        bench.servers._running.remove(server)
        _, pos = _written(log)
        os.unlink(server.sock)
        os.unlink(control)             # stale: the restarted server makes a new one
        os.sync()
        start = time.perf_counter()
        server = bench.servers.nbdkit("overlay-durable", "python", PLUGIN, "overlay=" + state,
                                      "base=" + base, "control=" + control, ready=False)
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            while True:
                event = qmp.next_event(TIMEOUT)
                if event is None:
                    raise RuntimeError("durable: no BLOCK_JOB_READY after the restart")
                if event["event"] == "BLOCK_JOB_READY":
                    seconds = time.perf_counter() - start
                    break
            written, _ = _written(log, pos)
            _cancel(qmp, "disk0")
        return seconds, written
    finally:
        _cleanup(bench, server, state, target, path, log)


# -- client write cost -------------------------------------------------------

def _old_plugin(bench):
    """The plugin as of $OVERLAY_BENCH_BEFORE, exported into the bench folder."""
    rev = os.environ.get("OVERLAY_BENCH_BEFORE", BEFORE)
    folder = bench.path("before-" + rev)
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "plugin"], check=True,
                             stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return os.path.join(folder, "plugin", "overlaydisk.py"), rev


def _write_seconds(uri, size, count, depth, seed):
    """Seconds per 4 KiB write at random offsets with `depth` writes in flight."""
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(seed)
    buf = nbd.Buffer.from_bytearray(bytearray(rnd.randbytes(4096)))
    blocks = size // 4096
    start = time.perf_counter()
    issued = 0
    pending = []
    while issued < count or pending:
        while issued < count and len(pending) < depth:
            pending.append(h.aio_pwrite(buf, rnd.randrange(blocks) * 4096))
            issued += 1
        h.poll(-1)
        pending = [c for c in pending if not h.aio_command_completed(c)]
    seconds = time.perf_counter() - start
    h.shutdown()
    return seconds / count


def cost_benchmark(bench, base):
    old, rev = _old_plugin(bench)
    count = 500 if bench.quick else WRITES
    groups = {}
    for depth in (1, 16):
        g = bench.group(SECTION, "cost-qd%d" % depth, "client 4 KiB random writes at QD%d, "
                        "background mirror in READY (%d writes)" % (depth, count), "us/write")
        g.row("before", "before durable jobs (%s)" % rev, anchor=True)
        g.row("after", "with job records and the write-intent log", goal=COST_GOAL)
        groups[depth] = g
    plugins = {"before": old, "after": PLUGIN}
    for i in range(bench.runs):
        bench.progress("durable cost: run %d/%d" % (i + 1, bench.runs))
        for key in rotated(["before", "after"], i):
            path, log, target = _target(bench)
            state, control = bench.path("cstate"), bench.path("cctl.sock")
            server = _start(bench, plugins[key], base, state, control, name="overlay-" + key)
            try:
                with QMPClient(control, timeout=TIMEOUT) as qmp:
                    _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": target.uri,
                                                       "sync": "full"})
                    for depth in rotated([1, 16], i):
                        per_write = _write_seconds(server.uri, bench.size, count, depth,
                                                   seed=100 * i + depth)
                        groups[depth].add(key, per_write * 1e6)
                    _cancel(qmp, "disk0")
            finally:
                _cleanup(bench, server, state, target, path, log)
