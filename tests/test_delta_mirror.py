"""drive-mirror with a bitmap (sync=incremental/bitmap): a delta move to a target that already
holds the disk as it was when the bitmap was created: only the bitmap's ranges and the writes
during the job are copied (counted by nbdkit's log filter on the target)."""

import random
import re

import pytest
from qemu.qmp import ExecuteError

from conftest import make_image
from faults import wait_until
from helpers import Control

MiB = 1 << 20
SIZE = 16 * MiB
G = 65536                     # the cluster size: the bitmap's and the mirror's granule
_REQUEST = re.compile(r" (Write|Zero|Trim) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ")


def _written(log_path):
    """Bytes the target was asked to write or zero, from nbdkit's log filter."""
    text = log_path.read_text() if log_path.exists() else ""
    return sum(int(count, 16) for kind, _, count in _REQUEST.findall(text)
               if kind in ("Write", "Zero"))


class Rig:
    def __init__(self, servers, tmp_path, connect):
        self.tmp, self.servers = tmp_path, servers
        base = make_image(tmp_path / "base.img", SIZE, [(0, 4 * MiB), (10 * MiB, 2 * MiB)],
                          seed=4)
        self.ctl = tmp_path / "ctl.sock"
        self.disk = servers.overlay(tmp_path / "ov", base=base, control=str(self.ctl))
        self.qmp = Control(self.ctl)
        self.h = connect(self.disk.uri)
        self.target_path = tmp_path / "target.img"
        with open(self.target_path, "wb") as f:
            f.truncate(SIZE)

    def disk_bytes(self):
        return bytes(self.h.pread(SIZE, 0))

    def full_backup_with_bitmap(self):
        """The older copy on the far side: a full backup taken with the bitmap's start."""
        self.qmp("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b0", "persistent": True}},
            {"type": "drive-backup",
             "data": {"device": "disk0", "target": str(self.target_path), "sync": "full",
                      "job-id": "seed"}}])
        self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device="seed")

    def logged_target(self):
        self.log = self.tmp / "target-requests.log"
        return self.servers.nbdkit("file", str(self.target_path), "logfile=%s" % self.log,
                                   filters=["log"])


@pytest.fixture
def rig(servers, tmp_path, connect):
    r = Rig(servers, tmp_path, connect)
    yield r
    r.qmp.close()


def test_delta_mirror_copies_exactly_the_bitmaps_ranges_and_the_target_equals_the_disk(rig):
    rig.h.pwrite(random.Random(1).randbytes(SIZE // 2), 0)
    rig.full_backup_with_bitmap()
    rnd = random.Random(2)
    for _ in range(13):                           # about 5% of the disk changes
        rig.h.pwrite(rnd.randbytes(G), rnd.randrange(SIZE // G) * G)
    rig.h.zero(G, 15 * MiB)
    dirty = rig.qmp("query-block")[0]["dirty-bitmaps"][0]["count"]
    assert 0 < dirty <= SIZE // 10
    target = rig.logged_target()
    rig.qmp("drive-mirror", device="disk0", target=target.uri, sync="incremental",
            bitmap="b0", job_id="delta")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    assert rig.qmp("query-block")[0]["dirty-bitmaps"][0]["busy"] is True
    assert _written(rig.log) == dirty              # nothing else went to the target
    rig.qmp("block-job-complete", device="delta")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert rig.target_path.read_bytes() == rig.disk_bytes()
    assert rig.qmp("query-block")[0]["dirty-bitmaps"][0]["busy"] is False


def test_writes_during_a_delta_mirror_are_copied_too(rig):
    rig.full_backup_with_bitmap()
    rnd = random.Random(3)
    for _ in range(10):
        rig.h.pwrite(rnd.randbytes(G), rnd.randrange(SIZE // G) * G)
    dirty = rig.qmp("query-block")[0]["dirty-bitmaps"][0]["count"]
    target = rig.logged_target()
    rig.qmp("drive-mirror", device="disk0", target=target.uri, sync="bitmap", bitmap="b0",
            job_id="delta", speed=MiB)
    during = set()
    for _ in range(8):
        off = rnd.randrange(SIZE // G) * G
        rig.h.pwrite(rnd.randbytes(G), off)
        during.add(off)
    rig.qmp("block-job-set-speed", device="delta", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    # At most the bitmap's ranges again where a write landed after their copy, plus the rest.
    assert dirty <= _written(rig.log) <= dirty + len(during) * G
    rig.qmp("block-job-complete", device="delta")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert rig.target_path.read_bytes() == rig.disk_bytes()


def test_small_writes_in_ready_copy_only_their_bytes(rig):
    """A 4 KiB write into a clean 64 KiB granule sends the target 4 KiB, not the granule
    (DirtyBitmap parts); two writes in one granule send the span between them; a write
    across granules sends them whole."""
    rig.h.pwrite(random.Random(1).randbytes(SIZE), 0)
    target = rig.logged_target()
    rig.qmp("drive-mirror", device="disk0", target=target.uri, sync="full", job_id="m")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    before = _written(rig.log)
    assert before == SIZE
    rig.qmp("block-job-pause", device="m")          # every write below in one batch
    rig.qmp.wait_status("m", "standby")
    n = SIZE // G
    rnd = random.Random(4)
    # Not adjacent: a run of dirty granules narrows only at its ends.
    granules = [2 * k for k in rnd.sample(range((n - 8) // 2), 19)]
    for g in granules[:18]:
        rig.h.pwrite(rnd.randbytes(4096), g * G + rnd.randrange(16) * 4096)
    g = granules[18]
    rig.h.pwrite(b"a" * 4096, g * G + 8192)
    rig.h.pwrite(b"b" * 512, g * G + 32768)
    rig.h.pwrite(rnd.randbytes(G + 8192), (n - 3) * G - 4096)     # granules n-4 .. n-2
    expected = 18 * 4096 + (32768 + 512 - 8192) + 3 * G
    rig.qmp("block-job-resume", device="m")
    wait_until(lambda: _written(rig.log) - before >= expected, timeout=30)
    rig.qmp("block-job-complete", device="m")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert _written(rig.log) - before == expected
    assert rig.target_path.read_bytes() == rig.disk_bytes()


def test_delta_mirror_arguments_are_checked_before_any_job_exists(rig):
    rig.qmp("block-dirty-bitmap-add", node="disk0", name="b0")
    cases = [
        (dict(sync="incremental"), "must provide a valid bitmap name for 'incremental' sync mode"),
        (dict(sync="bitmap", bitmap="nope"), "Bitmap 'nope' could not be found"),
        (dict(sync="full", bitmap="b0"), "Sync mode 'full' not supported with bitmap"),
    ]
    for args, text in cases:
        with pytest.raises(ExecuteError) as e:
            rig.qmp("drive-mirror", device="disk0", target=str(rig.target_path), **args)
        assert str(e.value) == text
    rig.qmp("drive-backup", device="disk0", target="export:v", sync="full", bitmap="b0",
            bitmap_mode="on-success", job_id="v")
    with pytest.raises(ExecuteError) as e:
        rig.qmp("drive-mirror", device="disk0", target=str(rig.target_path), sync="bitmap",
                bitmap="b0", job_id="m")
    # One job per device: the backup holding the bitmap is refused first.
    assert str(e.value) == "Node 'disk0' is busy: block device is in use by block job: backup"
    assert [j["device"] for j in rig.qmp("query-block-jobs")] == ["v"]
