"""Section "stream": block-stream of a random base into an empty overlay, ours vs QEMU's.

One random base of --size bytes (made once, page-cached).  Each run streams
it into a fresh, empty overlay:

- overlay: our nbdkit plugin (`overlay=... base=base.img`), `block-stream`
  over its control socket;
- qemu:    qemu-storage-daemon with a fresh qcow2 overlay (`-b base.img -F
  raw`), `block-stream` over its QMP monitor (the anchor).

Time: from sending block-stream to BLOCK_JOB_COMPLETED; starting the server
is not timed.  Ours includes making the result durable (the overlay is
flushed before the base is forgotten); QEMU's completion does not flush the
qcow2 data, so a third row adds QEMU's time to quit (which flushes and closes
the image) for a like-for-like figure.  Rows are interleaved and rotated per
run, after one untimed warm-up round, as in the overlay section.  Each row
adds the CPU time of its server over the same interval, per GiB of the base.
"""

import os
import socket
import shutil
import time

from jobctl.qmp_client import ConnectionProblem, QMPClient

from benchlib.bench import REPO, human_size
from benchlib.cpu import CpuMeter
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.servers import qsd_monitor

TITLE = "block-stream into an empty overlay: overlay plugin vs qemu-storage-daemon + qcow2"
SECTION = "stream"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
STREAM_GOAL = Goal(1.0)
TIMEOUT = 600.0


def run(bench):
    group = bench.group(SECTION, "stream", "block-stream of a %s random base into an empty "
                        "overlay, until BLOCK_JOB_COMPLETED" % human_size(bench.size),
                        "s", bench.size)
    group.row("qemu", "qemu-storage-daemon, qcow2 overlay on base", anchor=True)
    group.row("overlay", "overlay plugin, empty overlay on base (durable)", goal=STREAM_GOAL)
    group.row("qemu-durable", "qemu-storage-daemon, + quit (flushes the qcow2)")
    base = make_base(bench)
    for i in range(bench.runs + 1):
        bench.progress("stream: %s" % ("warm-up round" if i == 0 else
                                       "run %d/%d" % (i, bench.runs)))
        for key in rotated(["qemu", "overlay"], i):
            if key == "overlay":
                seconds, cpu = _ours(bench, base)
                if i > 0:
                    group.add("overlay", seconds, cpu=cpu)
            else:
                (seconds, cpu), (quit_seconds, quit_cpu) = _qemu(bench, base)
                if i > 0:
                    group.add("qemu", seconds, cpu=cpu)
                    group.add("qemu-durable", seconds + quit_seconds, cpu=cpu + quit_cpu)


def _stream(control_path, device, pid):
    """Send block-stream on a QMP socket and wait for its end: (seconds, CPU seconds
    of the server pid)."""
    meter = CpuMeter([pid])
    with QMPClient(control_path, timeout=TIMEOUT) as qmp:
        os.sync()       # earlier writeback must not land in this measurement
        meter.start()
        start = time.perf_counter()
        qmp.execute("block-stream", {"device": device, "job-id": "bench"})
        while True:
            event = qmp.next_event(TIMEOUT)
            if event is None:
                raise RuntimeError("block-stream on %s: no BLOCK_JOB_COMPLETED within %ss"
                                   % (control_path, TIMEOUT))
            if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                break
        seconds = time.perf_counter() - start
        meter.stop()
    if "error" in event["data"] or event["event"] != "BLOCK_JOB_COMPLETED":
        raise RuntimeError("block-stream on %s failed: %s" % (control_path, event))
    return seconds, meter.seconds


def _wait_for(path, server):
    """Until the control socket accepts (it exists a moment before it listens)."""
    deadline = time.monotonic() + 30
    while not _accepts(path):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("%s: no control socket %s%s" % (server.name, path,
                                                                server.log_tail()))
        time.sleep(0.01)


def _accepts(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _ours(bench, base):
    state = bench.path("state-stream")
    control = bench.path("stream-ctl.sock")
    server = bench.servers.nbdkit("overlay-stream", "python", PLUGIN, "overlay=" + state,
                                  "base=" + base, "control=" + control)
    try:
        _wait_for(control, server)
        return _stream(control, "disk0", server.pid)
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)


def _qemu(bench, base):
    """((seconds, CPU seconds) to BLOCK_JOB_COMPLETED, the same for qemu-storage-daemon
    to quit)."""
    image = bench.path("stream.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image])
    control = bench.path("qsd-qmp.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=qcow2,node-name=top,file.driver=file,file.filename=" + image,
            *qsd_monitor(control)]
    server = bench.servers.start("qsd-stream", lambda sock: argv, ready=False)
    try:
        _wait_for(control, server)
        streamed = _stream(control, "top", server.pid)
        quit_ = quit_server(control, server)
    finally:
        bench.servers.stop(server)
        os.unlink(image)
    return streamed, quit_


def quit_server(control, server):
    """QMP quit, wait for the exit: (seconds, CPU seconds of the server meanwhile).

    The server is a child of ours: its last CPU seconds reach us when it is
    waited for (benchlib.cpu).
    """
    meter = CpuMeter([server.pid]).start()
    start = time.perf_counter()
    try:
        with QMPClient(control) as qmp:
            qmp.execute("quit")
    except ConnectionProblem:
        pass        # it may close the socket before the reply arrives
    server.proc.wait(TIMEOUT)
    return time.perf_counter() - start, meter.stop()
