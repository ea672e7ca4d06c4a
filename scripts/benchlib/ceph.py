"""Section "ceph": drive-mirror of a random disk into a Ceph RBD image, three ways.

One one-node Ceph cluster (tests/cephcluster.py: one monitor, one memstore
OSD, one mgr, all on 127.0.0.1) for the whole section, and one random base of
--size bytes (made once, page-cached).  Each run mirrors the base (sync=full)
into a fresh, empty RBD image of the same size, until BLOCK_JOB_READY (the
target was flushed before READY), then cancels the job and removes the image:

- qsd:      qemu-storage-daemon with a fresh qcow2 overlay on the base,
            `blockdev-mirror` to a node of QEMU's own rbd driver
            (cache.direct=on, i.e. rbd_cache=false) (the anchor);
- native:   our plugin with an empty overlay on the base, `drive-mirror` to
            rbd://POOL/IMAGE?conf=PATH (librbd's aio calls inside nbdkit);
- qemu-nbd: our plugin, `drive-mirror` to an NBD URI served by
            `qemu-nbd --image-opts driver=rbd,... --cache=none` (QEMU's rbd
            driver behind NBD).

The native row first sends one drive-mirror to a 1 MiB image, which the size
check refuses after the target was opened: librados is then loaded in the
server (its first use costs ~0.1 s and ~22 MiB, once per server process, as a
long-running server has paid before anyone mirrors; QEMU loads its rbd driver
when the target node is created, before the timed command).  The timed
drive-mirror still connects to the cluster and opens the image.

All of them write through librbd with its cache off, into the same pool of the
same cluster.  Rows are interleaved and rotated per run, after one untimed
warm-up round.  The memstore OSD keeps the data in memory: capacity twice
--size plus room for the cluster.
"""

import os
import shutil
import sys

from jobctl.qmp_client import QMPClient, QMPError

from benchlib.bench import REPO, human_size
from benchlib.mirror import TIMEOUT, _cancel, _start_ours, _until_ready
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.stream import _wait_for
from benchlib.servers import qsd_monitor

TITLE = "drive-mirror into Ceph RBD: native librbd vs via qemu-nbd vs qemu-storage-daemon"
SECTION = "ceph"
POOL = "bench"
NATIVE_GOAL = Goal(1.0)
ROWS = ["qsd", "native", "qemu-nbd"]
WARM_IMAGE = "warm-up"


def _cluster_module():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from tests import cephcluster
    return cephcluster


def run(bench):
    cephcluster = _cluster_module()
    reason = cephcluster.available()
    if reason:
        bench.progress("ceph: skipped: %s" % reason)
        return
    ready = bench.group(SECTION, "ready", "mirror of a %s random disk into an empty RBD image "
                        "until BLOCK_JOB_READY" % human_size(bench.size), "s", bench.size)
    ready.row("qsd", "qemu-storage-daemon blockdev-mirror to its rbd driver "
              "(cache.direct=on), qcow2 overlay on base", anchor=True)
    ready.row("native", "overlay plugin drive-mirror to rbd:// (librbd aio)", goal=NATIVE_GOAL)
    ready.row("qemu-nbd", "overlay plugin drive-mirror to qemu-nbd --image-opts driver=rbd "
              "--cache=none")
    cpu = bench.group(SECTION, "cpu", "CPU time of the mirroring processes during that mirror "
                      "(nbdkit; + qemu-nbd; qemu-storage-daemon), the Ceph daemons excluded", "s")
    cpu.row("qsd", "qemu-storage-daemon", anchor=True)
    cpu.row("native", "nbdkit with the overlay plugin (librbd inside)")
    cpu.row("qemu-nbd", "nbdkit + qemu-nbd")
    bench.progress("ceph: starting a one-node cluster")
    cluster = cephcluster.CephCluster(bench.path("ceph"),
                                      memstore_bytes=2 * bench.size + (512 << 20))
    try:
        cluster.start()
        cluster.create_pool(POOL, pg_num=16)
        cluster.create_image(POOL, WARM_IMAGE, 1 << 20)
        bench.progress("ceph: cluster up in %.1f s" % cluster.startup_seconds)
        base = make_base(bench)
        runners = {"qsd": _qsd, "native": _native, "qemu-nbd": _qemu_nbd}
        for i in range(bench.runs + 1):
            bench.progress("ceph: %s" % ("warm-up round" if i == 0 else
                                         "run %d/%d" % (i, bench.runs)))
            for key in rotated(ROWS, i):
                image = "mirror%d-%s" % (i, key)
                cluster.create_image(POOL, image, bench.size)
                try:
                    seconds, cpu_seconds = runners[key](bench, cluster, base, image)
                finally:
                    cluster.remove_image(POOL, image)
                if i > 0:
                    ready.add(key, seconds)
                    cpu.add(key, cpu_seconds)
        memory = cluster.memory()
        bench.progress("ceph: daemon RSS at the end: %s" % ", ".join(
            "%s %d MiB" % (name, rss >> 20) for name, rss in sorted(memory.items())))
    finally:
        cluster.stop()


def _cpu(*servers):
    """User + system CPU seconds the servers' processes used so far."""
    total = 0
    for server in servers:
        with open("/proc/%d/stat" % server.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])      # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _mirror_ours(bench, base, target, name, also=(), warm=None):
    """(seconds to READY, CPU seconds of our server and `also` meanwhile).

    warm: a target of the wrong size, sent first (refused once opened).
    """
    server, state, control = _start_ours(bench, base, name)
    try:
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            if warm is not None:
                try:
                    qmp.execute("drive-mirror", {"device": "disk0", "target": warm,
                                                 "sync": "full"})
                    raise RuntimeError("warm-up drive-mirror to %s was not refused" % warm)
                except QMPError as e:
                    if "different sizes" not in e.desc:
                        raise
            cpu = _cpu(server, *also)
            seconds = _until_ready(qmp, "drive-mirror", {"device": "disk0", "target": target,
                                                        "sync": "full"})
            cpu = _cpu(server, *also) - cpu
            _cancel(qmp, "disk0")
        return seconds, cpu
    finally:
        bench.servers.stop(server)
        shutil.rmtree(state, ignore_errors=True)


def _native(bench, cluster, base, image):
    return _mirror_ours(bench, base, cluster.uri(POOL, image), "overlay-rbd",
                        warm=cluster.uri(POOL, WARM_IMAGE))


def _qemu_nbd(bench, cluster, base, image):
    # --shared=4: a pivot would open a second connection (not used here, but
    # the same server as in the tests); -t: stays up between clients.
    target = bench.servers.start("qemu-nbd-rbd", lambda sock: [
        "qemu-nbd", "-t", "-k", sock, "--shared=4", "--cache=none", "--image-opts",
        cluster.qemu_image_opts(POOL, image)])
    try:
        return _mirror_ours(bench, base, target.uri, "overlay-nbd-rbd", also=[target])
    finally:
        bench.servers.stop(target)


def _qsd(bench, cluster, base, image):
    overlay = bench.path("ceph-mirror.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay])
    control = bench.path("qsd-ceph.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=qcow2,node-name=src,file.driver=file,file.filename=" + overlay,
            "--blockdev", "driver=rbd,node-name=tgt,pool=%s,image=%s,conf=%s,cache.direct=on"
                          % (POOL, image, cluster.conf),
            *qsd_monitor(control)]
    server = bench.servers.start("qsd-ceph", lambda sock: argv, ready=False)
    try:
        _wait_for(control, server)
        with QMPClient(control, timeout=TIMEOUT) as qmp:
            cpu = _cpu(server)
            seconds = _until_ready(qmp, "blockdev-mirror", {"job-id": "bench", "device": "src",
                                                           "target": "tgt", "sync": "full"})
            cpu = _cpu(server) - cpu
            _cancel(qmp, "bench")
        return seconds, cpu
    finally:
        bench.servers.stop(server)
        os.unlink(overlay)
