"""Section "backup": drive-backup (docs/backup.md), ours vs qemu-storage-daemon's.

One random base of --size bytes (made once, page-cached).  Targets are fresh
sparse raw files served by `nbdkit file` on Unix sockets.

- full: our plugin with an empty overlay on the base, `drive-backup
  sync=full` until BLOCK_JOB_COMPLETED (the target flushed: durable), against
  qemu-storage-daemon with a fresh qcow2 overlay on the base, `blockdev-backup
  sync=full` to a raw-over-nbd node on the same kind of target (the anchor;
  QEMU does not flush the target at completion, so a reference row adds the
  `blockdev-del` of the target node, which does).  Goal <= 1.0x.
- incremental: on our plugin, a chain: `transaction` [block-dirty-bitmap-add
  (persistent), drive-backup full] (the anchor), then random 64 KiB writes at
  distinct aligned offsets totalling 5% of the disk, then `drive-backup
  sync=incremental bitmap=b0` onto the same target.  Goal <= 0.1x.
- CPU: both tables add the CPU time of the server that runs the job
  (benchlib.cpu), per GiB copied: the disk for a full backup, the changed
  bytes for the incremental one.
- latency: synchronous 4 KiB client writes (libnbd) at random offsets, each
  in its own not-yet-copied granule of the disk's upper half, during a backup
  held back by a speed limit (every write is a copy-before-write): ours vs
  qemu-storage-daemon's NBD export (nbd-server-start + block-export-add) of
  the disk its blockdev-backup copies (blockdev-backup inserts the
  copy-before-write filter above the node, under the export).  Median (goal
  <= 1.0x) and 99th percentile.
- resume (benchlib.backup_resume): ours only, a full backup killed (kill -9)
  at half way and restarted: bytes written after the restart, goal <= 60%.

Every backup of ours is checked against its point in time (sha256 of the
target file): the table `checks` counts the runs whose target differs (goal 0).
Rows are interleaved and rotated per run; full and incremental after one
untimed warm-up round.
"""

import contextlib
import os
import random
import shutil
import time

import nbd
from jobctl.qmp_client import QMPClient

from benchlib.backup_resume import CHANGE_WRITE, _sha256, resume_benchmark
from benchlib.bench import human_size
from benchlib.cpu import CpuMeter
from benchlib.mirror import TIMEOUT, _finish, _start_ours, _target
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.stream import _wait_for
from benchlib.servers import qsd_monitor

TITLE = "drive-backup: full and incremental vs qemu-storage-daemon, writes during, kill -9"
SECTION = "backup"
FULL_GOAL = Goal(1.0)
INCREMENTAL_GOAL = Goal(0.1)
LATENCY_GOAL = Goal(1.0)
CHECK_GOAL = Goal(0, relative=False)
CHANGED = 0.05                      # incremental: the fraction of the disk written
                                    # (in writes of CHANGE_WRITE bytes, at aligned offsets)
GRANULE = 64 << 10                  # the copy-before-write granule of both (their default)
LATENCY_WRITES = 2000
LATENCY_WINDOW = 120.0              # seconds the speed-limited backup needs to reach half


def run(bench):
    size = bench.size
    full = bench.group(SECTION, "full", "full backup of a %s random disk to an nbdkit file "
                       "target, until BLOCK_JOB_COMPLETED" % human_size(size), "s", size)
    full.row("qemu", "qemu-storage-daemon blockdev-backup, qcow2 overlay on base", anchor=True)
    full.row("overlay", "overlay plugin drive-backup, empty overlay on base (durable)",
             goal=FULL_GOAL)
    full.row("qemu-flushed", "qemu-storage-daemon, + blockdev-del of the target (flushes it)")
    inc = bench.group(SECTION, "incremental", "incremental backup of %d%% changed (random "
                      "64K writes) vs the full backup that started the chain"
                      % round(CHANGED * 100), "s")
    inc.row("full", "overlay plugin, transaction [bitmap-add, drive-backup full]", anchor=True)
    inc.row("incremental", "overlay plugin, drive-backup sync=incremental", goal=INCREMENTAL_GOAL)
    checks = Checks(bench)
    base = make_base(bench)
    base_sha = _sha256(base)
    for i in range(bench.runs + 1):
        bench.progress("backup: %s" % ("warm-up round" if i == 0 else
                                       "run %d/%d" % (i, bench.runs)))
        for key in rotated(["qemu", "overlay", "chain"], i):
            if key == "qemu":
                (seconds, cpu), (flushed, flushed_cpu) = _qsd_full(bench, base)
                if i > 0:
                    full.add("qemu", seconds, cpu=cpu)
                    full.add("qemu-flushed", flushed, cpu=flushed_cpu)
            elif key == "overlay":
                seconds, cpu, same = _ours_full(bench, base, base_sha)
                checks.add("full", same)
                if i > 0:
                    full.add("overlay", seconds, cpu=cpu)
            else:
                (f_s, f_cpu), (i_s, i_cpu), changed = _chain(bench, base, base_sha, checks,
                                                             seed=i)
                if i > 0:
                    inc.add("full", f_s, cpu=f_cpu, data=size)
                    inc.add("incremental", i_s, cpu=i_cpu, data=changed)
    latency_benchmark(bench, base)
    resume_benchmark(bench, base, base_sha, checks)
    checks.finish()
    os.unlink(base)


class Checks:
    """Runs whose target differs from its point in time, per kind (one sample each)."""

    KINDS = {"full": "full backup (table full)", "chain-full": "full backup of the chain",
             "incremental": "incremental backup", "resume": "backup resumed after kill -9"}

    def __init__(self, bench):
        self.bench = bench
        self.group = bench.group(SECTION, "checks", "runs whose target differs from the point "
                                 "in time (sha256 of the target file)", "runs")
        self.bad = {}
        for key, label in self.KINDS.items():
            self.group.row(key, label, goal=CHECK_GOAL)
            self.bad[key] = 0

    def add(self, kind, same):
        if not same:
            self.bad[kind] += 1
            self.bench.progress("backup: FAILED: the target of a %s differs from its point "
                                "in time" % self.KINDS[kind])

    def finish(self):
        for key, bad in self.bad.items():
            self.group.add(key, bad)


# -- helpers ---------------------------------------------------------------------

def _until_completed(qmp, command, args, pid):
    """Send command, wait for BLOCK_JOB_COMPLETED: (seconds, CPU seconds of server pid)."""
    os.sync()       # earlier writeback must not land in this measurement
    meter = CpuMeter([pid]).start()
    start = time.perf_counter()
    qmp.execute(command, args)
    while True:
        event = qmp.next_event(TIMEOUT)
        if event is None:
            raise RuntimeError("%s: no BLOCK_JOB_COMPLETED within %ss" % (command, TIMEOUT))
        if event["event"] == "BLOCK_JOB_COMPLETED":
            seconds = time.perf_counter() - start
            if "error" in event["data"]:
                raise RuntimeError("%s failed: %s" % (command, event["data"]))
            return seconds, meter.stop()
        if event["event"] == "BLOCK_JOB_CANCELLED":
            raise RuntimeError("%s was cancelled: %s" % (command, event["data"]))


def _cancel(qmp, device):
    qmp.execute("block-job-cancel", {"device": device, "force": True})
    while True:
        event = qmp.next_event(TIMEOUT)
        if event is None or event["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"):
            return


@contextlib.contextmanager
def _ours(bench, base, name):
    """Our plugin with an empty overlay on base: yields (server, QMP client)."""
    server, state, control = _start_ours(bench, base, name)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            yield server, qmp
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def _qsd(bench, base, target_sock, export=False):
    """qemu-storage-daemon: node src (a fresh qcow2 overlay on base), node tgt (raw over
    nbd to target_sock).  Yields (server, QMP client, NBD URI of src or None); export:
    serve src writable over NBD (nbd-server-start + block-export-add)."""
    image = bench.path("backup.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image])
    control = bench.path("qsd-backup.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=" + image,
            "--blockdev", "driver=raw,node-name=tgt,file.driver=nbd,file.server.type=unix,"
                          "file.server.path=" + target_sock,
            *qsd_monitor(control)]
    server = bench.servers.start("qsd-backup", lambda sock: argv, ready=False)
    try:
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            uri = None
            if export:
                sock = bench.path("qsd-export.sock")
                qmp.execute("nbd-server-start", {"addr": {"type": "unix",
                                                          "data": {"path": sock}}})
                qmp.execute("block-export-add", {"type": "nbd", "id": "exp", "node-name": "src",
                                                 "name": "src", "writable": True})
                uri = "nbd+unix:///src?socket=" + sock
            yield server, qmp, uri
    finally:
        bench.servers.stop(server)
        os.unlink(image)


# -- full and incremental ------------------------------------------------------------

def _qsd_full(bench, base):
    """((seconds, CPU seconds) to COMPLETED, the same to COMPLETED + blockdev-del of tgt)."""
    path, target = _target(bench)
    try:
        with _qsd(bench, base, target.sock) as (server, qmp, _):
            seconds, cpu = _until_completed(qmp, "blockdev-backup", {
                "job-id": "bench", "device": "src", "target": "tgt", "sync": "full"}, server.pid)
            meter = CpuMeter([server.pid]).start()
            start = time.perf_counter()
            qmp.execute("blockdev-del", {"node-name": "tgt"})   # closing flushes it
            deleted = time.perf_counter() - start
            return (seconds, cpu), (seconds + deleted, cpu + meter.stop())
    finally:
        _finish(bench, target, path)


def _ours_full(bench, base, base_sha):
    """(seconds, CPU seconds, the target is the point in time)."""
    path, target = _target(bench)
    try:
        with _ours(bench, base, "overlay-backup") as (server, qmp):
            seconds, cpu = _until_completed(qmp, "drive-backup", {
                "device": "disk0", "job-id": "bench", "sync": "full", "target": target.uri},
                server.pid)
        return seconds, cpu, _sha256(path) == base_sha
    finally:
        _finish(bench, target, path)


def _change(uri, size, seed):
    """Random CHANGE_WRITE writes at distinct aligned offsets, CHANGED of the disk, then a
    flush; returns {offset: data}."""
    rnd = random.Random(seed)
    blocks = size // CHANGE_WRITE
    written = {}
    h = nbd.NBD()
    h.connect_uri(uri)
    for block in rnd.sample(range(blocks), max(1, int(blocks * CHANGED))):
        data = rnd.randbytes(CHANGE_WRITE)
        h.pwrite(data, block * CHANGE_WRITE)
        written[block * CHANGE_WRITE] = data
    h.flush()
    h.shutdown()
    return written


def _chain(bench, base, base_sha, checks, seed):
    """Full backup starting a bitmap, 5% changed, incremental onto the same target:
    ((seconds, CPU) of the full, (seconds, CPU) of the incremental, bytes changed)."""
    path, target = _target(bench)
    try:
        with _ours(bench, base, "overlay-chain") as (server, qmp):
            full = _until_completed(qmp, "transaction", {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "disk0", "name": "b0", "persistent": True}},
                {"type": "drive-backup",
                 "data": {"device": "disk0", "job-id": "full", "sync": "full",
                          "target": target.uri}}]}, server.pid)
            checks.add("chain-full", _sha256(path) == base_sha)
            written = _change(server.uri, bench.size, seed)
            incremental = _until_completed(qmp, "drive-backup", {
                "device": "disk0", "job-id": "inc", "sync": "incremental", "bitmap": "b0",
                "target": target.uri}, server.pid)
        checks.add("incremental", _sha256(path) == _sha256(base, written))
        return full, incremental, len(written) * CHANGE_WRITE
    finally:
        _finish(bench, target, path)


# -- client write latency during a backup ---------------------------------------------

def _latency_speed(size):
    """A speed limit that keeps the sequential copy out of the upper half for
    LATENCY_WINDOW seconds."""
    return max(64 << 10, int(size / 2 / LATENCY_WINDOW))


def _latency_offsets(size, count, seed):
    """count offsets of 4 KiB writes, each in its own granule of the upper half."""
    rnd = random.Random(seed)
    first, end = size // 2 // GRANULE, size // GRANULE
    granules = rnd.sample(range(first, end), min(count, end - first))
    return [g * GRANULE + rnd.randrange(GRANULE // 4096) * 4096 for g in granules]


def _write_latencies(uri, offsets, seed):
    """Seconds each synchronous 4 KiB write took."""
    h = nbd.NBD()
    h.connect_uri(uri)
    data = random.Random(seed).randbytes(4096)
    times = []
    for offset in offsets:
        start = time.perf_counter()
        h.pwrite(data, offset)
        times.append(time.perf_counter() - start)
    h.shutdown()
    return times


def _measure_during(bench, qmp, command, args, uri, offsets, seed, device):
    """Start the speed-limited backup, write, cancel it; the write times."""
    start = time.monotonic()
    qmp.execute(command, args)
    times = _write_latencies(uri, offsets, seed)
    if (time.monotonic() - start) * args["speed"] >= bench.size / 2:
        bench.progress("backup latency: %s may have copied into the written half: some "
                       "writes were no copy-before-write" % command)
    _cancel(qmp, device)
    return times


def latency_benchmark(bench, base):
    count = 200 if bench.quick else LATENCY_WRITES
    speed = _latency_speed(bench.size)
    group = bench.group(SECTION, "latency", "client 4 KiB write latency during a backup, each "
                        "write a copy-before-write (median of %d writes)" % count, "us")
    group.row("qemu", "qemu-storage-daemon NBD export, under its blockdev-backup", anchor=True)
    group.row("overlay", "overlay plugin, under drive-backup", goal=LATENCY_GOAL)
    p99 = bench.group(SECTION, "latency-p99", "the same: 99th percentile", "us")
    p99.row("qemu", "qemu-storage-daemon NBD export, under its blockdev-backup", anchor=True)
    p99.row("overlay", "overlay plugin, under drive-backup")
    for i in range(bench.runs):
        bench.progress("backup latency: run %d/%d" % (i + 1, bench.runs))
        # The same offsets for both: each write lands in a granule not copied yet.
        offsets = _latency_offsets(bench.size, count, seed=i)
        for key in rotated(["qemu", "overlay"], i):
            path, target = _target(bench)
            try:
                if key == "qemu":
                    with _qsd(bench, base, target.sock, export=True) as (_, qmp, uri):
                        times = _measure_during(bench, qmp, "blockdev-backup", {
                            "job-id": "bench", "device": "src", "target": "tgt",
                            "sync": "full", "speed": speed}, uri, offsets, i, "bench")
                else:
                    with _ours(bench, base, "overlay-latency") as (server, qmp):
                        times = _measure_during(bench, qmp, "drive-backup", {
                            "device": "disk0", "job-id": "bench", "sync": "full",
                            "target": target.uri, "speed": speed}, server.uri, offsets, i,
                            "bench")
            finally:
                _finish(bench, target, path)
            times.sort()
            group.add(key, times[len(times) // 2] * 1e6)
            p99.add(key, times[max(0, int(len(times) * 0.99) - 1)] * 1e6)
