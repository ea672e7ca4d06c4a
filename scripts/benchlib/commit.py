"""Section "commit": block-commit of a full overlay into a raw file base, ours vs QEMU's.

One random image of --size bytes (made once, page-cached) is what the overlay
holds.  Each run starts from a fresh sparse base file and a fresh overlay
filled with that image through NBD (`nbdcopy --flush`, not timed):

- overlay: our nbdkit plugin (`overlay=... base=base.raw`), `block-commit`
  over its control socket, READY, `block-job-complete`;
- qemu:    qemu-storage-daemon with a qcow2 overlay on the same kind of base
  (filled through its own NBD export), `block-commit` of the active layer,
  READY, `job-complete` (the anchor).

Time: from sending block-commit to BLOCK_JOB_COMPLETED.  Ours includes making
the result durable (the base flushed, the emptied overlay's map synced and
renamed); QEMU's completion flushes the base at READY but not the qcow2 it
drops from the chain, so a third row adds QEMU's time to quit, as the stream
section does.  Rows are interleaved and rotated per run, after one untimed
warm-up round.  Each row adds the CPU time of its server over the same
interval, per GiB committed.
"""

import os
import shutil
import time

from jobctl.qmp_client import QMPClient

from benchlib.bench import REPO, human_size
from benchlib.cpu import CpuMeter
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.stream import _wait_for, quit_server
from benchlib.servers import qsd_monitor, qsd_export

TITLE = "block-commit of a full overlay into a file base: overlay plugin vs qemu-storage-daemon"
SECTION = "commit"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
COMMIT_GOAL = Goal(1.0)
TIMEOUT = 600.0


def run(bench):
    group = bench.group(SECTION, "commit", "block-commit of a %s overlay (every cluster "
                        "written) into a sparse raw base, until BLOCK_JOB_COMPLETED"
                        % human_size(bench.size), "s", bench.size)
    group.row("qemu", "qemu-storage-daemon, qcow2 overlay on a raw base", anchor=True)
    group.row("overlay", "overlay plugin, full overlay on a raw base (durable)",
              goal=COMMIT_GOAL)
    group.row("qemu-durable", "qemu-storage-daemon, + quit (flushes and closes)")
    data = make_base(bench)
    for i in range(bench.runs + 1):
        bench.progress("commit: %s" % ("warm-up round" if i == 0 else
                                       "run %d/%d" % (i, bench.runs)))
        for key in rotated(["qemu", "overlay"], i):
            if key == "overlay":
                seconds, cpu = _ours(bench, data)
                if i > 0:
                    group.add("overlay", seconds, cpu=cpu)
            else:
                (seconds, cpu), (quit_seconds, quit_cpu) = _qemu(bench, data)
                if i > 0:
                    group.add("qemu", seconds, cpu=cpu)
                    group.add("qemu-durable", seconds + quit_seconds, cpu=cpu + quit_cpu)


def _fresh_base(bench):
    path = bench.path("commit-base.raw")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    return path


def _commit(control, device, complete, pid):
    """block-commit on a QMP socket, READY, complete: (seconds to BLOCK_JOB_COMPLETED,
    CPU seconds of the server pid meanwhile)."""
    meter = CpuMeter([pid])
    with QMPClient(control, timeout=TIMEOUT) as qmp:
        os.sync()       # the fill's writeback must not land in this measurement
        meter.start()
        start = time.perf_counter()
        qmp.execute("block-commit", {"device": device, "job-id": "bench"})
        while True:
            event = qmp.next_event(TIMEOUT)
            if event is None:
                raise RuntimeError("block-commit on %s: no event within %ss"
                                   % (control, TIMEOUT))
            name = event["event"]
            if name == "BLOCK_JOB_READY":
                qmp.execute(complete, {"id": "bench"} if complete == "job-complete"
                            else {"device": "bench"})
            elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                break
        seconds = time.perf_counter() - start
        meter.stop()
    if name != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
        raise RuntimeError("block-commit on %s failed: %s" % (control, event))
    return seconds, meter.seconds


def _ours(bench, data):
    base = _fresh_base(bench)
    state = bench.path("state-commit")
    control = bench.path("commit-ctl.sock")
    server = bench.servers.nbdkit("overlay-commit", "python", PLUGIN, "overlay=" + state,
                                  "base=" + base, "control=" + control)
    try:
        _wait_for(control, server)
        bench.run(["nbdcopy", "--flush", data, server.uri])
        return _commit(control, "disk0", "block-job-complete", server.pid)
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)
        os.unlink(base)


def _qemu(bench, data):
    """((seconds, CPU seconds) to BLOCK_JOB_COMPLETED, the same for qemu-storage-daemon
    to quit)."""
    base = _fresh_base(bench)
    image = bench.path("commit.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image])
    control = bench.path("qsd-commit.sock")
    export = bench.path("qsd-commit-export.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=file,node-name=basef,filename=" + base,
            "--blockdev", "driver=raw,node-name=base,file=basef",
            "--blockdev", "driver=qcow2,node-name=top,backing=base,file.driver=file,"
            "file.filename=" + image,
            *qsd_export(export, "top"), *qsd_monitor(control)]
    server = bench.servers.start("qsd-commit", lambda sock: argv, ready=False)
    try:
        _wait_for(control, server)
        bench.run(["nbdcopy", "--flush", data, "nbd+unix:///top?socket=" + export])
        committed = _commit(control, "top", "job-complete", server.pid)
        quit_ = quit_server(control, server)
    finally:
        bench.servers.stop(server)
        os.unlink(image)
        os.unlink(base)
    return committed, quit_
