"""QEMU's newer mirror members: actively-synced (query-block-jobs) and target-is-zero
(drive-mirror, QEMU 10.1), against real nbdkit servers."""

import json
import re

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
