"""Section "mirror": drive-mirror of a random disk to an nbdkit file target, ours vs QEMU's.

One random base of --size bytes (made once, page-cached).  Each run mirrors it
(sync=full) to a fresh sparse raw file served by `nbdkit file`:

- overlay: our plugin with an empty overlay on the base, `drive-mirror` over its
  control socket, until BLOCK_JOB_READY (the target was flushed before READY);
- qemu:    qemu-storage-daemon with a fresh qcow2 overlay on the same base,
  `blockdev-mirror` to an NBD client node on the same kind of target, until
  BLOCK_JOB_READY (the anchor);
- nbdcopy: `nbdcopy base.img TARGET` (includes its final flush): the lower bound.

Then the latency a client write sees: 4 KiB synchronous writes at random
offsets through libnbd, median and 99th percentile, with no job and with a
background mirror in READY (every write is then copied to the target).  Both
phases follow a mirror to READY (the idle one cancels it) and write into
fresh clusters of their own half of the disk (_phases).

Rows are interleaved and rotated per run, after one untimed warm-up round.
The ready and copy tables add the CPU time of the process doing the copy (our
nbdkit, qemu-storage-daemon, nbdcopy) per GiB; the target's is not counted.
"""

import os
import random
import shutil
import statistics
import time

from jobctl.qmp_client import QMPClient

from benchlib.bench import REPO, human_size
from benchlib.cpu import CpuMeter
from benchlib.overlay import make_base, rotated
from benchlib.stream import _wait_for
from benchlib.results import Goal
from benchlib.servers import qsd_monitor, qsd_export
from benchlib.smallio import DEFAULT_THREADS, FRESH_WRITE_MEMORY, recycle_memory

TITLE = "drive-mirror to an nbdkit file target: overlay plugin vs qemu-storage-daemon"
SECTION = "mirror"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
READY_GOAL = Goal(0.8)
LATENCY_GOAL = Goal(1.1)
TIMEOUT = 600.0
LATENCY_WRITES = 2000


def run(bench):
    ready = bench.group(SECTION, "ready", "mirror of a %s random disk until BLOCK_JOB_READY"
                        % human_size(bench.size), "s", bench.size)
    ready.row("qemu", "qemu-storage-daemon blockdev-mirror, qcow2 overlay on base", anchor=True)
    ready.row("overlay", "overlay plugin drive-mirror, empty overlay on base", goal=READY_GOAL)
    ready.row("nbdcopy", "nbdcopy --flush base.img to the target (lower bound)")
    copy = bench.group(SECTION, "copy", "the same, target flushes discarded (the copy engines "
                       "alone, without the disk's fdatasync)", "s", bench.size)
    copy.row("qemu", "qemu-storage-daemon blockdev-mirror", anchor=True)
    copy.row("overlay", "overlay plugin drive-mirror", goal=READY_GOAL)
    copy.row("nbdcopy", "nbdcopy base.img to the target (lower bound)")
    base = make_base(bench)
    runners = {"qemu": _qemu, "overlay": _ours, "nbdcopy": _nbdcopy}
    # Each row writes the whole target into fresh page cache: on this VM memory
    # the host took back costs a host fault on first touch (1.2 s per GiB,
    # section smallio, "Fresh memory"), which whichever row came first after a
    # quiet moment paid (the copy table's anchor moved 117-248%).  Touched and
    # freed just before, the memory every row gets is the same.
    fresh = max(FRESH_WRITE_MEMORY, bench.size + (1 << 29))
    for i in range(bench.runs + 1):
        bench.progress("mirror: %s" % ("warm-up round" if i == 0 else
                                       "run %d/%d" % (i, bench.runs)))
        for key in rotated(["qemu", "overlay", "nbdcopy"], i):
            recycle_memory(fresh)
            seconds, cpu = runners[key](bench, base)
            if i > 0:
                ready.add(key, seconds, cpu=cpu)
        for key in rotated(["qemu", "overlay", "nbdcopy"], i):
            recycle_memory(fresh)
            seconds, cpu = runners[key](bench, base, discard_flush=True)
            if i > 0:
                copy.add(key, seconds, cpu=cpu)
    latency_benchmark(bench, base)


def _target(bench, discard_flush=False):
    """A fresh sparse raw file served by nbdkit; discard_flush drops its flushes."""
    path = bench.path("target.img")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    if discard_flush:
        return path, bench.servers.nbdkit("target", "--filter=fua", "file", path,
                                          "fuamode=discard")
    return path, bench.servers.nbdkit("target", "file", path)


def _finish(bench, target, path):
    bench.servers.stop(target)
    os.unlink(path)


def _until_ready(qmp, command, args, meter=None):
    """Seconds from sending command to BLOCK_JOB_READY; meter: a CpuMeter run meanwhile."""
    os.sync()
    if meter is not None:
        meter.start()
    start = time.perf_counter()
    qmp.execute(command, args)
    while True:
        event = qmp.next_event(TIMEOUT)
        if event is None:
            raise RuntimeError("%s: no BLOCK_JOB_READY within %ss" % (command, TIMEOUT))
        if event["event"] == "BLOCK_JOB_READY":
            seconds = time.perf_counter() - start
            if meter is not None:
                meter.stop()
            return seconds
        if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            raise RuntimeError("%s ended early: %s" % (command, event))


def _cancel(qmp, device):
    qmp.execute("block-job-cancel", {"device": device, "force": True})
    while True:
        event = qmp.next_event(TIMEOUT)
        if event is None or event["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"):
            return


def _start_ours(bench, base, name, env=None):
    """Our plugin as scripts/nbdkit-overlay ships it (--threads 2, not nbdkit's 16:
    with 16 the client's 99th percentile in READY was 2.1-3.8x idle where 2 gave
    1.4-2.2x, docs/benchmarks.md), an empty overlay on base, a control socket."""
    state = bench.path("state-" + name)
    control = bench.path(name + "-ctl.sock")
    server = bench.servers.nbdkit(name, "--threads", str(DEFAULT_THREADS), "python", PLUGIN,
                                  "overlay=" + state, "base=" + base, "control=" + control,
                                  env=env)
    _wait_for(control, server)
    return server, state, control


def _ours(bench, base, discard_flush=False):
    path, target = _target(bench, discard_flush)
    try:
        return ours_mirror_until_ready(bench, base, target.uri, "overlay-mirror")
    finally:
        _finish(bench, target, path)


def ours_mirror_until_ready(bench, base, uri, name, env=None):
    """Our plugin with an empty overlay on base: drive-mirror to uri until
    BLOCK_JOB_READY; returns (seconds, CPU seconds of our nbdkit).  env: the
    server's environment."""
    server, state, control = _start_ours(bench, base, name, env)
    try:
        meter = CpuMeter([server.pid])
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            seconds = _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": uri,
                                                        "sync": "full"}, meter)
            _cancel(qmp, "disk0")
        return seconds, meter.seconds
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)


def _qemu(bench, base, discard_flush=False):
    path, target = _target(bench, discard_flush)
    try:
        return qsd_mirror_until_ready(bench, base, "driver=raw,node-name=tgt,file.driver=nbd,"
                                      "file.server.type=unix,file.server.path=" + target.sock)
    finally:
        _finish(bench, target, path)


def qsd_mirror_until_ready(bench, base, target_blockdev, extra_args=(), env=None,
                           while_ready=None):
    """qemu-storage-daemon with a fresh qcow2 overlay on base: blockdev-mirror to the
    node `tgt` (target_blockdev) until BLOCK_JOB_READY; returns (seconds, CPU seconds
    of the daemon).  env: the daemon's environment.

    while_ready(uri): called while the job is READY with the NBD URI of the
    mirrored disk (QSD exports node src, writable; the mirror's filter takes
    over the export, so the export's writes are mirrored), before the cancel.
    """
    image = bench.path("mirror.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image])
    control = bench.path("qsd-mirror.sock")
    export = []
    if while_ready is not None:
        export_sock = bench.path("qsd-export.sock")
        export = qsd_export(export_sock, "src")
    argv = ["qemu-storage-daemon", *extra_args,
            "--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=" + image,
            "--blockdev", target_blockdev, *export,
            *qsd_monitor(control)]
    server = bench.servers.start("qsd-mirror", lambda sock: argv, env=env, ready=False)
    try:
        _wait_for(control, server)
        meter = CpuMeter([server.pid])
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            seconds = _until_ready(qmp, "blockdev-mirror", {"job-id": "bench", "device": "src",
                                                           "target": "tgt", "sync": "full"},
                                   meter)
            if while_ready is not None:
                while_ready("nbd+unix:///src?socket=" + export_sock)
            _cancel(qmp, "bench")
        return seconds, meter.seconds
    finally:
        bench.servers.stop(server)
        os.unlink(image)


def _nbdcopy(bench, base, discard_flush=False):
    path, target = _target(bench, discard_flush)
    try:
        return bench.timed_cpu(["nbdcopy", "--flush", base, target.uri])
    finally:
        _finish(bench, target, path)


def _write_latencies(uri, lo, hi, count, seed):
    """Seconds each of `count` synchronous 4 KiB writes at random offsets in [lo, hi) took."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(seed)
    data = rnd.randbytes(4096)
    times = []
    for _ in range(count):
        offset = rnd.randrange(lo // 4096, hi // 4096) * 4096
        start = time.perf_counter()
        h.pwrite(data, offset)
        times.append(time.perf_counter() - start)
    h.shutdown()
    return times


def _drop_cached(path):
    """Drop the target file's cached pages (after a sync: all clean).  The copy to
    READY wrote it sequentially, and on kernels whose page cache keeps large
    folios (ext4 since 6.16) a 4 KiB write into such a file dirties its whole
    folio, up to 2 MiB: 500 writes in READY dirtied 400 MiB of the target here,
    whose writeback then slowed the client's writes.  That is the kernel's cost
    for a target on the same disk, not the mirror's; read back afresh, the
    pages are small again."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def latency_benchmark(bench, base):
    count = 200 if bench.quick else LATENCY_WRITES
    group = bench.group(SECTION, "latency", "client 4 KiB write latency (median of %d writes)"
                        % count, "us")
    group.row("idle", "overlay plugin, no job", anchor=True)
    group.row("ready", "overlay plugin, background mirror in READY", goal=LATENCY_GOAL)
    p99 = bench.group(SECTION, "latency-p99", "client 4 KiB write latency (99th percentile)",
                      "us")
    p99.row("idle", "overlay plugin, no job", anchor=True)
    p99.row("ready", "overlay plugin, background mirror in READY")
    # The same measure on QEMU (context, no goal): what a mirror in READY costs
    # qemu-storage-daemon's own clients, against QSD with no job.
    qsd = bench.group(SECTION, "latency-qsd", "the same on qemu-storage-daemon (median)", "us")
    qsd.row("idle", "qemu-storage-daemon, no job", anchor=True)
    qsd.row("ready", "qemu-storage-daemon, background mirror in READY")
    qsd99 = bench.group(SECTION, "latency-qsd-p99",
                        "the same on qemu-storage-daemon (99th percentile)", "us")
    qsd99.row("idle", "qemu-storage-daemon, no job", anchor=True)
    qsd99.row("ready", "qemu-storage-daemon, background mirror in READY")
    for i in range(bench.runs):
        bench.progress("mirror latency: run %d/%d" % (i + 1, bench.runs))
        for key, times in _our_latencies(bench, base, count, i).items():
            group.add(key, statistics.median(times) * 1e6)
            p99.add(key, _p99(times) * 1e6)
        for key, times in _qsd_latencies(bench, base, count, i).items():
            qsd.add(key, statistics.median(times) * 1e6)
            qsd99.add(key, _p99(times) * 1e6)


def _p99(times):
    return sorted(times)[int(len(times) * 0.99) - 1]


def _phases(bench, uri, count, i, start_mirror, cancel, target_path):
    """Both phases on one server and one disk, in an order that rotates per run,
    so that the only difference between them is the mirror: {phase: [seconds]}.

    Both start the same way, from a mirror that copied the disk to READY (the
    idle phase cancels it first), and each writes into its own half of the
    disk, into clusters nothing wrote before.  Without that, the phases measured
    their history as much as the mirror (docs/benchmarks.md, "tenth
    session"): a phase right after the server started was slower than
    one after a 1 GiB copy, and the second phase's writes found clusters the
    first had allocated (an allocated cluster takes a write in about half the
    time of a fresh one), so the rotation decided the ratio.
    """
    out = {}
    half = bench.size // 2
    for key in rotated(["idle", "ready"], i):
        start_mirror()
        _drop_cached(target_path)
        if key == "idle":
            cancel()
        # Neither phase pays for the writeback of what came before it.
        os.sync()
        lo = 0 if key == "idle" else half
        out[key] = _write_latencies(uri, lo, lo + half, count, seed=2 * i + (key == "ready"))
        if key == "ready":
            cancel()
    return out


def _our_latencies(bench, base, count, i):
    server, state, control = _start_ours(bench, base, "overlay-latency")
    path, target = _target(bench)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            return _phases(bench, server.uri, count, i, lambda: _until_ready(
                qmp, "drive-mirror", {"device": "disk0", "target": target.uri, "sync": "full"}),
                lambda: _cancel(qmp, "disk0"), path)
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)
        _finish(bench, target, path)


def _qsd_latencies(bench, base, count, i):
    """QSD exporting a fresh qcow2 overlay on base (node src) over NBD; blockdev-mirror
    to the same kind of target (its filter takes over the export's writes)."""
    image = bench.path("latency.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image])
    path, target = _target(bench)
    control = bench.path("qsd-latency.sock")
    export_sock = bench.path("qsd-latency-export.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=" + image,
            "--blockdev", "driver=raw,node-name=tgt,file.driver=nbd,file.server.type=unix,"
                          "file.server.path=" + target.sock,
            *qsd_export(export_sock, "src"), *qsd_monitor(control)]
    server = bench.servers.start("qsd-latency", lambda sock: argv, ready=False)
    try:
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            return _phases(bench, "nbd+unix:///src?socket=" + export_sock, count, i,
                           lambda: _until_ready(qmp, "blockdev-mirror", {
                               "job-id": "bench", "device": "src", "target": "tgt",
                               "sync": "full"}),
                           lambda: _cancel(qmp, "bench"), path)
    finally:
        bench.servers.stop(server)
        os.unlink(image)
        _finish(bench, target, path)
