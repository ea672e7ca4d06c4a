"""Block jobs with Ceph RBD, against real nbdkit and a real one-node Ceph (tests/cephcluster.py).

- A live disk (a writer running) mirrored into an RBD image, natively
  (target=rbd://...) and through qemu-nbd in front of RBD (QEMU's rbd
  driver), completed and pivoted: `rbd export` of the image equals the disk,
  and the pivoted disk keeps serving from RBD after a restart.
- A disk over an RBD base (base=rbd://...): remembered by the state
  directory, streamed, and standing alone afterwards.
- The error policies with real Ceph faults: the OSD stopped (SIGSTOP; the
  target's timeout= turns the wait into ETIMEDOUT) under ignore and stop, and
  a pool over its quota (EDQUOT, reported as ENOSPC) under enospc.

The cluster is shared by the module; the tests that stop its OSD or fill a
pool restore it in `finally`.
"""

import itertools
import json
import os
import signal
import threading

import pytest

from conftest import Server, make_image
from faults import wait_until
from helpers import Control, Writer
from jobctl.qmp_client import QMPError

MiB = 1 << 20
SIZE = 24 * MiB
# librbd waits on a stopped OSD for as long as it is stopped; this bounds
# each request, so the job sees ETIMEDOUT (docs/ceph.md).
FAULT_TIMEOUT = 2

_names = itertools.count()
_pools = set()


@pytest.fixture(autouse=True, scope="module")
def _fresh_pools():
    _pools.clear()
    yield


def new_image(cluster, size=SIZE, pool="rbd"):
    """An empty image in pool (created on first use); returns (name, rbd:// address)."""
    if pool not in _pools:
        cluster.create_pool(pool)
        _pools.add(pool)
    name = "img%d" % next(_names)
    return name, cluster.create_image(pool, name, size)


def base_image(tmp_path, size=SIZE, seed=5):
    """A raw base with data in three places and holes between them."""
    return make_image(tmp_path / "base.img", size,
                      [(0, 3 * MiB), (size // 3 + 4097, 5 * MiB), (size - 2 * MiB, 2 * MiB)],
                      seed=seed)


def read_disk(h, size=SIZE):
    return b"".join(bytes(h.pread(min(8 * MiB, size - o), o)) for o in range(0, size, 8 * MiB))


class Disk:
    """Our nbdkit over an overlay directory, its QMP session and one client connection."""

    def __init__(self, servers, connect, tmp_path, base=None, size=None):
        self.servers, self.connect = servers, connect
        self.dir = tmp_path / "ov"
        self.ctl = tmp_path / "ctl.sock"
        self.server = servers.overlay(self.dir, base=base, size=size, control=str(self.ctl))
        self.qmp = Control(self.ctl)
        self.h = connect(self.server.uri)

    def restart(self):
        """Stop cleanly and start again with only the state directory."""
        self.qmp.close()
        self.h.shutdown()
        assert self.server.stop() == 0
        self.server = self.servers.overlay(self.dir, control=str(self.ctl))
        self.qmp = Control(self.ctl)
        self.h = self.connect(self.server.uri)

    def bytes(self):
        return read_disk(self.h)

    def block(self):
        return self.qmp.execute("query-block")[0]

    def errors(self):
        return [e["data"] for e in self.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]

    def complete(self):
        self.qmp("block-job-complete", device="disk0")
        done = self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
        assert "error" not in done["data"], done
        self.qmp.wait_status("disk0", "null")

    def close(self):
        self.qmp.close()


@pytest.fixture
def disks(servers, connect, tmp_path):
    made = []

    def make(**kwargs):
        d = Disk(servers, connect, tmp_path, **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


# -- mirror a live disk into RBD, complete, pivot ---------------------------------

def qemu_nbd_over_rbd(servers, cluster, tmp_path, pool, image):
    """qemu-nbd serving an RBD image through QEMU's rbd driver.

    --shared=4: the pivot opens the disk's own connection while the mirror's is
    still open (qemu-nbd's default is one client at a time).  -t: it stays up
    across the disk's restart.  --cache=none: no librbd cache, as natively.
    """
    sock = tmp_path / "qemu-nbd.sock"
    argv = ["qemu-nbd", "-k", str(sock), "-t", "--shared=4", "--cache=none", "--image-opts",
            cluster.qemu_image_opts(pool, image)]
    server = Server(argv, sock, tmp_path / "qemu-nbd.log")
    servers.started.append(server)          # killed by pid at the end of the test
    return server.wait_ready()


@pytest.mark.parametrize("way", ["native", "qemu-nbd"])
def test_live_disk_mirrors_into_rbd_pivots_and_serves_from_rbd_after_restart(
        ceph_cluster, servers, disks, tmp_path, way):
    name, uri = new_image(ceph_cluster)
    target = uri if way == "native" else \
        qemu_nbd_over_rbd(servers, ceph_cluster, tmp_path, "rbd", name).uri
    disk = disks(base=base_image(tmp_path))
    disk.h.pwrite(b"overlay!" * 512, 7 * MiB + 3)
    # A guest's pace, not a flood: a writer that dirties the disk faster than a
    # one-node memstore Ceph on 2 shared cores takes the copies keeps any mirror
    # from converging (QEMU's too; that is what copy-mode=write-blocking is for).
    writer = Writer(disk.server.uri, SIZE, seed=3, lengths=(512, 4096, 65536, 69999),
                    pace=0.002)
    writer.start()
    try:
        disk.qmp("drive-mirror", device="disk0", target=target, sync="full", granularity=65536)
        disk.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
        writer.wait_for(20)                      # still writing while ready
    finally:
        writes = writer.finish()
    assert writes > 20
    disk.complete()
    assert disk.block()["active"] == target
    served = disk.bytes()
    assert ceph_cluster.export_image("rbd", name) == served
    # Writes now go to the image.
    disk.h.pwrite(b"after the pivot", 11 * MiB)
    disk.h.flush()
    assert ceph_cluster.export_image("rbd", name)[11 * MiB:11 * MiB + 15] == b"after the pivot"
    disk.restart()
    assert disk.block()["active"] == target
    disk.h.pwrite(b"after the restart", 13 * MiB + 1)
    disk.h.flush()
    exported = ceph_cluster.export_image("rbd", name)
    assert exported[13 * MiB + 1:13 * MiB + 18] == b"after the restart"
    assert disk.bytes() == exported


def test_mirror_skips_the_zero_ranges_of_the_disk(ceph_cluster, disks, tmp_path):
    """sync=full onto an empty image: holes of the disk are neither written nor allocated."""
    name, uri = new_image(ceph_cluster)
    disk = disks(base=base_image(tmp_path))
    disk.qmp("drive-mirror", device="disk0", target=uri, sync="full")
    disk.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    disk.complete()
    assert ceph_cluster.export_image("rbd", name) == disk.bytes()
    # The base's data touches 4 of the image's 6 objects (4 MiB each).
    used = ceph_cluster.rbd("du", "--format", "json", "rbd/%s" % name)
    assert 0 < json.loads(used)["images"][0]["used_size"] <= 4 * 4 * MiB


def test_drive_mirror_refuses_bad_rbd_targets_with_one_line(ceph_cluster, disks, tmp_path):
    _, small = new_image(ceph_cluster, size=SIZE // 2)
    disk = disks(size=SIZE)
    cases = [
        (small, "Source and target image have different sizes"),
        (ceph_cluster.uri("rbd", "no-such-image"), "Could not open 'rbd://rbd/no-such-image"),
        ("rbd://rbd/x?conf=ceph.conf", "relative path 'ceph.conf' is not accepted"),
        ("rbd://rbd", "rbd address must be rbd://POOL/IMAGE"),
    ]
    for target, expect in cases:
        with pytest.raises(QMPError) as e:
            disk.qmp("drive-mirror", device="disk0", target=target, sync="full")
        assert expect in str(e.value) and "\n" not in str(e.value), (target, str(e.value))
    assert disk.qmp.execute("query-block-jobs") == []


# -- an RBD base --------------------------------------------------------------------

def test_stream_from_an_rbd_base_leaves_a_standalone_overlay(ceph_cluster, disks, tmp_path,
                                                             connect):
    nbd = pytest.importorskip("nbd")
    new_image(ceph_cluster, size=MiB)             # the pool exists
    base_file = base_image(tmp_path, seed=9)
    uri = ceph_cluster.import_image("rbd", "base-stream", base_file)
    disk = disks(base=uri)
    assert disk.block()["base"] == uri
    # A hole of the base reads as zeros and is reported as one (diff_iterate).
    status = []
    disk.h.block_status(MiB, 4 * MiB,
                        lambda ctx, off, entries, err: status.extend(entries) or 0)
    assert status[1] & nbd.STATE_ZERO
    disk.h.pwrite(b"mine" * 1024, 5 * MiB)
    expected = bytearray(open(base_file, "rb").read())
    expected[5 * MiB:5 * MiB + 4096] = b"mine" * 1024
    # The state directory remembers the base: a restart needs only overlay=.
    disk.restart()
    assert disk.block()["base"] == uri
    assert disk.bytes() == expected
    disk.qmp("block-stream", device="disk0")
    done = disk.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
    assert "error" not in done["data"] and done["data"]["offset"] == SIZE
    assert disk.block()["base"] is None
    assert disk.block()["allocation"]["absent-clusters"] == 0
    # Standalone: the image can go, the disk is unchanged.
    disk.qmp.close()
    disk.h.shutdown()
    assert disk.server.stop() == 0
    ceph_cluster.remove_image("rbd", "base-stream")
    disk.server = disk.servers.overlay(disk.dir, control=str(disk.ctl))
    disk.qmp = Control(disk.ctl)
    disk.h = connect(disk.server.uri)
    assert disk.block()["base"] is None
    assert disk.bytes() == expected


# -- policies with Ceph faults --------------------------------------------------------

def test_full_pool_under_enospc_pauses_with_nospace_and_resume_completes(ceph_cluster, disks,
                                                                         tmp_path):
    pool = "quota"
    name, uri = new_image(ceph_cluster, pool=pool)       # created before the pool is full
    filler = make_image(tmp_path / "filler.img", 2 * MiB, [(0, 2 * MiB)], seed=1)
    ceph_cluster.import_image(pool, "filler", filler)
    ceph_cluster.set_pool_quota(pool, max_bytes=MiB)
    try:
        ceph_cluster.wait_pool_full(pool)
        disk = disks(base=base_image(tmp_path))
        disk.qmp("drive-mirror", device="disk0", target=uri, sync="full",
                 on_target_error="enospc")
        error = disk.qmp.wait_event("BLOCK_JOB_ERROR", timeout=60)
        assert error["data"] == {"device": "disk0", "operation": "write", "action": "stop",
                                 "x-errno": "ENOSPC", "x-desc": "No space left on device"}
        disk.qmp.wait_status("disk0", "paused")
        info = disk.qmp.job("disk0")
        assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "nospace")
        assert not info["ready"]
    finally:
        ceph_cluster.set_pool_quota(pool, max_bytes=0)
    ceph_cluster.wait_pool_full(pool, full=False)
    disk.qmp("block-job-resume", device="disk0")
    disk.qmp.wait_status("disk0", "running")
    assert disk.qmp.job("disk0")["io-status"] == "ok"
    disk.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    disk.complete()
    assert disk.block()["active"] == uri
    assert ceph_cluster.export_image(pool, name) == disk.bytes()


@pytest.mark.parametrize("policy", ["ignore", "stop"])
def test_stopped_osd_mid_mirror_then_continued_completes(ceph_cluster, disks, tmp_path,
                                                         policy):
    name, uri = new_image(ceph_cluster)
    target = "%s&timeout=%d" % (uri, FAULT_TIMEOUT)
    disk = disks(base=base_image(tmp_path))
    disk.qmp("drive-mirror", device="disk0", target=target, sync="full",
             on_target_error=policy, speed=4 * MiB)
    wait_until(lambda: disk.qmp.job("disk0")["offset"] > 0, timeout=60)
    osd = ceph_cluster.osd_pid()
    os.kill(osd, signal.SIGSTOP)
    try:
        error = disk.qmp.wait_event("BLOCK_JOB_ERROR", timeout=60)
        assert {k: error["data"][k] for k in ("device", "operation", "action")} == {
            "device": "disk0", "operation": "write", "action": policy}
        if policy == "stop":
            disk.qmp.wait_status("disk0", "paused")
            info = disk.qmp.job("disk0")
            assert (info["status"], info["io-status"]) == ("paused", "failed")
        else:
            info = disk.qmp.job("disk0")
            assert (info["status"], info["paused"], info["ready"]) == ("running", False, False)
        # The disk keeps serving its clients meanwhile.
        disk.h.pwrite(b"while the OSD is stopped", 2 * MiB + 7)
    finally:
        os.kill(osd, signal.SIGCONT)
    if policy == "stop":
        disk.qmp("block-job-resume", device="disk0")
    disk.qmp("block-job-set-speed", device="disk0", speed=0)
    disk.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    disk.complete()
    assert ceph_cluster.export_image("rbd", name) == disk.bytes()
    assert {e["action"] for e in disk.errors()} == {policy}


def test_force_cancel_while_the_osd_hangs_with_timeout_0_is_prompt(ceph_cluster, disks, tmp_path):
    """timeout=0: requests wait for the stopped OSD for ever, yet a cancel ends the job."""
    _, uri = new_image(ceph_cluster)
    disk = disks(base=base_image(tmp_path))
    disk.qmp("drive-mirror", device="disk0", target=uri + "&timeout=0", sync="full",
             speed=4 * MiB)
    wait_until(lambda: disk.qmp.job("disk0")["offset"] > 0, timeout=60)
    osd = ceph_cluster.osd_pid()
    os.kill(osd, signal.SIGSTOP)
    try:
        disk.qmp("block-job-cancel", device="disk0", force=True)
        disk.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        disk.qmp.wait_status("disk0", "null")
        assert disk.block()["active"] is None
        disk.h.pwrite(b"still served", MiB)
        assert disk.h.pread(12, MiB) == b"still served"
    finally:
        os.kill(osd, signal.SIGCONT)


def test_drive_mirror_to_an_unreachable_cluster_does_not_hold_the_control_socket(
        servers, connect, tmp_path):
    """librados tries an unreachable monitor until its timeout; the image opens in the
    background (as an NBD target connects), so the command returns within its short
    connect wait, other clients are answered meanwhile, and the open's failure goes to
    on-target-error (report: the job ends with the error)."""
    import cephcluster
    import socket
    import time
    reason = cephcluster.available()
    if reason:
        pytest.skip(reason)
    with socket.socket() as s:            # a port on loopback that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "dead.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:%d\nauth cluster required = none\n"
                    "auth service required = none\nauth client required = none\n" % port)
    disk = Disk(servers, connect, tmp_path, size=SIZE)
    target = "rbd://rbd/img?conf=%s&timeout=8" % conf
    replied = threading.Event()

    def start():
        own = Control(disk.ctl)
        try:
            own("drive-mirror", device="disk0", target=target, sync="full")
        finally:
            replied.set()
            own.close()

    starter = threading.Thread(target=start)
    t0 = time.monotonic()
    starter.start()
    other = Control(disk.ctl)
    assert other.execute("query-status")["running"] is True
    assert replied.wait(5), "drive-mirror waited for librados"
    assert time.monotonic() - t0 < 5
    starter.join()
    done = other.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device="disk0")
    assert "error" in done["data"], done
    other.close()
    disk.close()
