"""Section "durable": a mirror that outlives the process (docs/jobs.md), and what it costs.

restart: a random --size disk mirrored (sync=full, no speed limit) to a fresh
sparse raw file served by `nbdkit --filter=log file` on a Unix socket (its log
counts the bytes written).  The anchor is a fresh mirror until BLOCK_JOB_READY; the
measured row mirrors until offset >= len/2, kills nbdkit with SIGKILL,
starts it again on the same state directory and waits for BLOCK_JOB_READY
of the recovered job.  Two tables: bytes written to the target after the
restart (goal <= 0.6 of the fresh mirror's), and seconds to READY (goal <=
0.6x the fresh mirror's).  Both rows of the time table count from the exec
of nbdkit: after a crash, the operator without durable jobs starts nbdkit
again and then the mirror again.  A third row shows the fresh mirror's time
from drive-mirror alone (no start-up), for reference.  The target server
lives on across the kill, so the restarted job finds the same instance and
trusts what it had copied (docs/overlay.md, "COPIED").  A third table does
the same over TCP (127.0.0.1), where no instance can be told and the
restarted job compares those regions instead.

cost: client 4 KiB writes at random offsets for a fixed count, at queue
depth 1 and 16 (libnbd aio), while a background mirror is in READY, on this
code and on the code before durable jobs (git revision $OVERLAY_BENCH_BEFORE,
default BEFORE below, exported with `git archive`).  Shown as microseconds
per write (1e6 / IOPS); goal: at most 1.11x the old code's, i.e. the
persistence costs at most 10% of the IOPS.  A third row runs the same writes
against qemu-storage-daemon (qcow2 overlay on the base, exported over NBD)
while its own blockdev-mirror to the same kind of target is READY.
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
from benchlib.mirror import TIMEOUT, _until_ready, _cancel, qsd_mirror_until_ready
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.servers import free_port, wait_for_port
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
    ready = bench.group(SECTION, "ready", "seconds from the exec of nbdkit to READY: a fresh "
                        "mirror vs the restart of a mirror killed at 50%", "s")
    ready.row("fresh", "fresh mirror: nbdkit exec, drive-mirror, READY", anchor=True)
    ready.row("restart", "restart (nbdkit exec) to READY of the recovered job",
              goal=RESTART_GOAL)
    ready.row("fresh-mirror", "fresh mirror, drive-mirror to READY only (no start-up)")
    tcp = bench.group(SECTION, "ready-tcp", "the same over TCP (127.0.0.1): the restarted job "
                      "compares what it had copied (no instance to trust)", "s")
    tcp.row("fresh", "fresh mirror: nbdkit exec, drive-mirror, READY", anchor=True)
    tcp.row("restart", "restart (nbdkit exec) to READY of the recovered job")
    base = make_base(bench)
    for i in range(bench.runs + 1):
        bench.progress("durable: %s" % ("warm-up round" if i == 0 else
                                        "run %d/%d" % (i, bench.runs)))
        for key in rotated(["fresh", "restart", "fresh-tcp", "restart-tcp"], i):
            over_tcp = key.endswith("-tcp")
            if key.startswith("fresh"):
                seconds, mirror_seconds, written = _fresh(bench, base, over_tcp)
            else:
                seconds, written = _killed_again_if_the_target_crashed(bench, base, over_tcp)
            if i == 0:
                continue
            if over_tcp:
                tcp.add(key[:-len("-tcp")], seconds)
                continue
            ready.add(key, seconds)
            copied.add(key, written / (1 << 20))
            if key == "fresh":
                ready.add("fresh-mirror", mirror_seconds)
    cost_benchmark(bench, base)


def _target(bench, over_tcp=False):
    """(path, log, server, uri): the target file behind nbdkit's log filter."""
    path, log = bench.path("dtarget.img"), bench.path("dtarget.log")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    args = ("--filter=log", "file", path, "logfile=" + log)
    if not over_tcp:
        server = bench.servers.nbdkit("target", *args)
        return path, log, server, server.uri
    port = free_port()
    server = bench.servers.start("target-tcp", lambda sock: [
        "nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *args], ready=False)
    wait_for_port(port, server)
    return path, log, server, "nbd://127.0.0.1:%d/" % port


def _written(log, since=0):
    with open(log, "rb") as f:
        f.seek(since)
        data = f.read()
    return sum(int(m.group(1), 16) for m in _WRITE_RE.finditer(data)), since + len(data)


def _start(bench, plugin, base, state, control, name="overlay-durable"):
    server = bench.servers.nbdkit(name, "python", plugin, "overlay=" + state,
                                  "base=" + base, "control=" + control, ready=False)
    _wait_for(control, server)       # the control socket opens after nbdkit serves
    return server


def _cleanup(bench, server, state, target, path, log):
    for s in (server, target):
        if s is not None and s in bench.servers._running:
            bench.servers.stop(s)
    shutil.rmtree(state, ignore_errors=True)
    for p in (path, log):
        if os.path.exists(p):
            os.unlink(p)


def _fresh(bench, base, over_tcp=False):
    path, log, target, uri = _target(bench, over_tcp)
    state, control = bench.path("dstate"), bench.path("dctl.sock")
    start = time.perf_counter()
    server = _start(bench, PLUGIN, base, state, control)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            seconds = _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": uri,
                                                        "sync": "full"})
            total = time.perf_counter() - start
            written, _ = _written(log)
            _cancel(qmp, "disk0")
        return total, seconds, written
    finally:
        _cleanup(bench, server, state, target, path, log)


class TargetCrashed(Exception):
    """The target nbdkit died when the kill cut its client off (not our server)."""


def _killed_again_if_the_target_crashed(bench, base, over_tcp, attempts=3):
    """_killed(); nbdkit 1.32's file server sometimes aborts when a client with
    many writes in flight vanishes (connections.c raw_send_socket: Assertion
    `sock >= 0' failed): that round is run again, and said so."""
    for attempt in range(attempts):
        try:
            return _killed(bench, base, over_tcp)
        except TargetCrashed as e:
            bench.progress("durable: the target nbdkit died at the kill (not ours; round "
                           "repeated, attempt %d/%d):%s" % (attempt + 1, attempts, e))
    raise RuntimeError("durable: the target nbdkit died at the kill %d times" % attempts)


def _killed(bench, base, over_tcp=False):
    path, log, target, uri = _target(bench, over_tcp)
    state, control = bench.path("dstate"), bench.path("dctl.sock")
    server = _start(bench, PLUGIN, base, state, control)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            qmp.execute("drive-mirror", {"device": "disk0", "target": uri, "sync": "full"})
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
            deadline = time.monotonic() + TIMEOUT
            while True:
                event = qmp.next_event(1.0)
                if event is not None and event["event"] == "BLOCK_JOB_READY":
                    seconds = time.perf_counter() - start
                    break
                if target.proc.poll() is not None:
                    bench.servers._running.remove(target)      # dead: nothing to stop
                    raise TargetCrashed(target.log_tail())
                if event is not None and event["event"] == "BLOCK_JOB_COMPLETED":
                    raise RuntimeError("durable: the recovered job ended: %s" % event["data"])
                if time.monotonic() > deadline:
                    raise RuntimeError("durable: no BLOCK_JOB_READY after the restart")
            written, _ = _written(log, pos)
            _cancel(qmp, "disk0")
        return seconds, written
    finally:
        _cleanup(bench, server, state, target, path, log)


# -- client write cost -------------------------------------------------------

# The old entry script with today's request-path change that has nothing to do
# with durable jobs (plugin/threadstate.py: worker threads keep their Python
# thread state), so that the cost rows differ only by the job records.
_KEPT_ENTRY = '''\
import importlib, importlib.util, os
_here = os.path.dirname(os.path.realpath(__file__))
_spec = importlib.util.spec_from_file_location("_old_entry", os.path.join(_here, "overlaydisk.py"))
_old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_old)
_KeptStates = importlib.import_module(_old._PACKAGE + ".threadstate").KeptStates
API_VERSION = _old.API_VERSION
for _name in ("thread_model", "config", "config_complete", "after_fork", "cleanup"):
    globals()[_name] = getattr(_old, _name)

class _Conn:
    def __init__(self, h):
        self.h, self.states = h, _KeptStates()

def open(readonly):
    return _Conn(_old.open(readonly))

def close(h):
    h.states.release()

def _wrap(name):
    fn = getattr(_old, name)
    if name.startswith("can_") or name in ("get_size", "block_size"):
        return lambda h: fn(h.h)
    def request(h, *args):
        h.states.keep()
        return fn(h.h, *args)
    return request

for _name in ("get_size", "block_size", "can_write", "can_flush", "can_trim", "can_zero",
              "can_fast_zero", "can_fua", "can_multi_conn", "can_cache", "can_extents",
              "pread", "pwrite", "flush", "trim", "zero", "cache", "extents"):
    if hasattr(_old, _name):
        globals()[_name] = _wrap(_name)
'''


def _old_plugin(bench):
    """The plugin as of $OVERLAY_BENCH_BEFORE, exported into the bench folder, behind
    an entry script that adds today's kept thread states (_KEPT_ENTRY)."""
    rev = os.environ.get("OVERLAY_BENCH_BEFORE", BEFORE)
    folder = bench.path("before-" + rev)
    os.makedirs(folder)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "plugin"], check=True,
                             stdout=subprocess.PIPE).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    shutil.copy(os.path.join(REPO, "plugin", "threadstate.py"),
                os.path.join(folder, "plugin", "threadstate.py"))
    entry = os.path.join(folder, "plugin", "kept_entry.py")
    with open(entry, "w") as f:
        f.write(_KEPT_ENTRY)
    return entry, rev


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
        g.row("before", "before durable jobs (%s, + kept thread states)" % rev, anchor=True)
        g.row("after", "with job records and the write-intent log", goal=COST_GOAL)
        g.row("qsd", "qemu-storage-daemon, qcow2 overlay, under its own blockdev-mirror")
        groups[depth] = g
    plugins = {"before": old, "after": PLUGIN}
    for i in range(bench.runs):
        bench.progress("durable cost: run %d/%d" % (i + 1, bench.runs))
        for key in rotated(["before", "after", "qsd"], i):
            if key == "qsd":
                _qsd_cost(bench, base, groups, count, i)
                continue
            path, log, target, uri = _target(bench)
            state, control = bench.path("cstate"), bench.path("cctl.sock")
            server = _start(bench, plugins[key], base, state, control, name="overlay-" + key)
            try:
                with QMPClient(control, timeout=TIMEOUT) as qmp:
                    _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": uri,
                                                       "sync": "full"})
                    for depth in rotated([1, 16], i):
                        per_write = _write_seconds(server.uri, bench.size, count, depth,
                                                   seed=100 * i + depth)
                        groups[depth].add(key, per_write * 1e6)
                    _cancel(qmp, "disk0")
            finally:
                _cleanup(bench, server, state, target, path, log)


def _qsd_cost(bench, base, groups, count, i):
    """The same writes into qemu-storage-daemon's export of a disk under its own mirror."""
    path, log, target, _ = _target(bench)

    def writes(uri):
        for depth in rotated([1, 16], i):
            groups[depth].add("qsd", _write_seconds(uri, bench.size, count, depth,
                                                    seed=100 * i + depth) * 1e6)
    try:
        qsd_mirror_until_ready(bench, base, "driver=raw,node-name=tgt,file.driver=nbd,"
                               "file.server.type=unix,file.server.path=" + target.sock,
                               while_ready=writes)
    finally:
        bench.servers.stop(target)
        for p in (path, log):
            if os.path.exists(p):
                os.unlink(p)
