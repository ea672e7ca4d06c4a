"""QEMU's newer mirror members: actively-synced (query-block-jobs) and target-is-zero
(drive-mirror, QEMU 10.1), against real nbdkit servers."""

import json

from conftest import make_image
from faults import MirrorRig, wait_until

MiB = 1 << 20
SIZE = 4 * MiB
HOLE = (SIZE // 2 - 65536, 2 * 65536)      # MirrorRig's base has no data here


def job(rig):
    return rig.qmp.job("disk0")


def test_actively_synced_while_write_blocking_keeps_the_target_in_sync(servers, tmp_path,
                                                                         connect):
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE)
    rig.mirror(copy_mode="write-blocking", speed=MiB)
    assert job(rig)["actively-synced"] is False          # not in sync yet
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    assert job(rig)["actively-synced"] is True
    rig.h.pwrite(b"W" * 65536, 65536)                    # written through, still in sync
    assert job(rig)["actively-synced"] is True
    rig.qmp("block-job-pause", device="disk0")           # paused: changes wait in the bitmap
    rig.h.pwrite(b"P" * 65536, 3 * 65536)
    assert job(rig)["actively-synced"] is False
    rig.qmp("block-job-resume", device="disk0")
    wait_until(lambda: job(rig)["actively-synced"])
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_bytes() == rig.disk_bytes()


def test_a_background_mirror_is_never_actively_synced(servers, tmp_path, connect):
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE)
    rig.mirror()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    assert job(rig)["actively-synced"] is False
    rig.qmp("block-job-change", id="disk0", copy_mode="write-blocking")
    wait_until(lambda: job(rig)["actively-synced"])


def _junk_target(tmp_path):
    """A target that does NOT read as zeroes: target-is-zero is the operator's claim."""
    return make_image(tmp_path / "target.img", SIZE, [(0, SIZE)], seed=3)


def test_target_is_zero_writes_no_zero_range_and_asks_no_extents(servers, tmp_path, connect):
    _junk_target(tmp_path)
    log = tmp_path / "target.log"
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE, target_filters=["log"],
                    target_args=["logfile=%s" % log])
    junk = rig.target_bytes()
    rig.mirror(target_is_zero=True)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    text = log.read_text()
    assert " Zero " not in text and " Extents " not in text
    record = json.loads((tmp_path / "ov" / "jobs" / "disk0.json").read_text())
    assert record["target-is-zero"] is True
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    target = open(tmp_path / "target.img", "rb").read()
    off, n = HOLE
    assert target[off:off + n] == junk[off:off + n]      # the hole was not written
    disk = rig.disk_bytes()
    assert target[:off] == disk[:off] and target[off + n:] == disk[off + n:]


def test_without_target_is_zero_the_zero_ranges_are_zeroed(servers, tmp_path, connect):
    _junk_target(tmp_path)
    log = tmp_path / "target.log"
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE, target_filters=["log"],
                    target_args=["logfile=%s" % log])
    rig.mirror()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    text = log.read_text()
    assert " Zero " in text and " Extents " in text
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert open(tmp_path / "target.img", "rb").read() == rig.disk_bytes()


def test_a_restored_mirror_keeps_target_is_zero(servers, tmp_path, connect):
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE)
    rig.mirror(target_is_zero=True, speed=MiB)
    rig.qmp.wait_status("disk0", "running")
    rig.qmp.close()
    rig.disk.kill9()
    rig.disk = servers.restart(rig.disk)
    rig.qmp = type(rig.qmp)(rig.ctl_path)
    assert rig.qmp.wait_event("JOB_RECOVERED")["data"]["id"] == "disk0"
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    record = json.loads((tmp_path / "ov" / "jobs" / "disk0.json").read_text())
    assert record["target-is-zero"] is True
