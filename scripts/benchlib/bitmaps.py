"""Section "bitmaps": what persistent dirty bitmaps cost a client's 4K random writes.

fio's nbd engine (as section smallio) writes 4K at random over a disk of --size bytes
whose every cluster is in the overlay (writes in place: the strictest measure, no
copy-on-write to hide the cost in), at QD1 (iodepth=1) and QD32 (iodepth=32,
numjobs=2), --io-seconds per job (default 3 s; 0.2 s with --quick).  Rows:

    none        ours, no bitmap (the anchor)
    one         ours, 1 persistent bitmap recording (64K)          goal >= 0.9x
    four        ours, 4 persistent bitmaps recording (64K, 64K, 1M, 4M)  goal >= 0.8x
    four-mem    ours, the same 4 bitmaps not persistent: the in-memory marking alone
                (four against four-mem is what durability costs)
    qsd         qemu-storage-daemon 7.2, the same disk as a fully allocated qcow2
    qsd-bitmap  the same with a persistent qcow2 bitmap (qemu-img bitmap --add, 64K)

The /qsd column divides by the qsd row.  Every row's server stays up for the whole
section; each fio run starts after the others' (about --io-seconds each), long
enough for our checkpoints to clear the regions idle since (docs/bitmaps.md), so
each run also pays the first writes into cleared regions (one fdatasync per group of
16 regions): the steady state of a guest that pauses and writes again.
"""

import os
import shutil

from jobctl.qmp_client import QMPClient

from benchlib.bench import human_size
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.smallio import DEFAULT_THREADS, PLUGIN, Target, Workload, measure
from benchlib.servers import qsd_export

TITLE = "4K random writes with 0, 1, 4 persistent dirty bitmaps (and QSD with a qcow2 bitmap)"
SECTION = "bitmaps"
IO_SECONDS = 3.0
QUICK_IO_SECONDS = 0.2
WORKLOADS = [Workload("randwrite-4k-qd1", "randwrite", 4096, 1, 1),
             Workload("randwrite-4k-qd32", "randwrite", 4096, 32, 2)]
BITMAPS = {"none": [], "one": [65536], "four": [65536, 65536, 1 << 20, 4 << 20],
           "four-mem": [65536, 65536, 1 << 20, 4 << 20]}
GOALS = {"one": Goal(0.9, at_least=True), "four": Goal(0.8, at_least=True)}
LABELS = {
    "none": "ours, every cluster in the overlay, no bitmap",
    "one": "ours, 1 persistent bitmap recording",
    "four": "ours, 4 persistent bitmaps recording",
    "four-mem": "ours, 4 bitmaps recording, not persistent",
    "qsd": "qemu-storage-daemon, allocated qcow2, no bitmap",
    "qsd-bitmap": "qemu-storage-daemon, allocated qcow2, 1 persistent bitmap",
}


def _ours(bench, state, key):
    control = bench.path("ctl-%s.sock" % key)
    server = bench.servers.nbdkit("bitmaps-" + key, "--threads", str(DEFAULT_THREADS),
                                  "python", PLUGIN, "overlay=" + state, "control=" + control)
    with QMPClient(control, timeout=60) as qmp:
        for i, granularity in enumerate(BITMAPS[key]):
            qmp.execute("block-dirty-bitmap-add", {"node": "disk0", "name": "b%d" % i,
                                                   "granularity": granularity,
                                                   "persistent": key != "four-mem"})
    return server


def _qsd(bench, image, key):
    def argv(sock):
        return ["qemu-storage-daemon",
                "--blockdev", "driver=qcow2,node-name=disk0,file.driver=file,"
                              "file.filename=" + image,
                *qsd_export(sock, "disk0", name="")]
    return bench.servers.start(key, argv)


def _targets(bench, base):
    """Start every row's server (prepared once, kept for the section)."""
    full = bench.path("state-full")
    bench.progress("bitmaps: filling an overlay with every cluster (nbdcopy, not timed)")
    server = bench.servers.nbdkit("bitmaps-fill", "python", PLUGIN, "overlay=" + full,
                                  "base=" + base)
    bench.run(["nbdcopy", base, server.uri])
    bench.servers.stop(server)
    targets = []
    for key in BITMAPS:
        state = bench.path("state-" + key)
        shutil.copytree(full, state)
        targets.append(Target(key, LABELS[key], None, True, _ours(bench, state, key)))
    shutil.rmtree(full)
    bench.progress("bitmaps: two allocated qcow2 copies of the base for qemu-storage-daemon")
    for key in ("qsd", "qsd-bitmap"):
        image = bench.path(key + ".qcow2")
        bench.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", base, image])
        if key == "qsd-bitmap":
            bench.run(["qemu-img", "bitmap", "--add", "-g", "65536", image, "bm"])
        targets.append(Target(key, LABELS[key], None, True, _qsd(bench, image, key)))
    return targets


def run(bench):
    seconds = bench.io_seconds or (QUICK_IO_SECONDS if bench.quick else IO_SECONDS)
    runs = 1 if bench.quick else bench.runs
    base = make_base(bench)
    tables = {}
    for w in WORKLOADS:
        iops = bench.group(SECTION, w.key, "%s, %s disk: IOPS" % (w.title, human_size(bench.size)),
                           "IOPS", refs=["qsd"])
        cpu = bench.group(SECTION, w.key + "-cpu", w.title + ": server CPU per request", "us")
        for key, label in LABELS.items():
            iops.row(key, label, anchor=(key == "none"), goal=GOALS.get(key))
            cpu.row(key, label, anchor=(key == "none"))
        tables[w.key] = (iops, cpu)
    targets = _targets(bench, base)
    try:
        for i in range(runs):
            bench.progress("bitmaps: run %d/%d (%d fio runs of %gs)"
                           % (i + 1, runs, len(WORKLOADS) * len(targets), seconds))
            for n, workload in enumerate(WORKLOADS):
                iops, cpu = tables[workload.key]
                for key, (rate, _, per_request, total, data) in measure(
                        bench, rotated(targets, i + n), workload, seconds).items():
                    iops.add(key, rate, cpu=total, data=data)
                    cpu.add(key, per_request)
    finally:
        for target in targets:
            bench.servers.stop(target.server)
        os.unlink(base)
