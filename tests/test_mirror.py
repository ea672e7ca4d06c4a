"""The mirror job against real nbdkit targets: lifecycle, events, pivot, convergence."""

import time

import pytest

from conftest import make_image
from helpers import Control, Writer
from plugin.qmp.job_info import block_job_info

MiB = 1 << 20
SIZE = 16 * MiB


class Setup:
    """Base image, overlay server with a control socket, a raw target file served by nbdkit."""

    def __init__(self, servers, tmp_path, connect, size=SIZE, target_fill=None):
        self.tmp = tmp_path
        self.servers = servers
        self.connect = connect
        self.base = make_image(tmp_path / "base.img", size,
                               [(0, 2 * MiB), (size // 3 + 4097, size // 6), (size - MiB, MiB)], seed=7)
        self.ctl_path = tmp_path / "ctl.sock"
        self.overlay_dir = tmp_path / "ov"
        self.disk = servers.overlay(self.overlay_dir, base=self.base, control=str(self.ctl_path))
        self.target_path = tmp_path / "target.img"
        if target_fill is not None:
            self.target_path.write_bytes(target_fill)
        else:
            with open(self.target_path, "wb") as f:
                f.truncate(size)
        self.target = servers.nbdkit("file", str(self.target_path))
        self.qmp = Control(self.ctl_path)
        self.h = connect(self.disk.uri)

    def mirror(self, **args):
        args.setdefault("sync", "full")
        return self.qmp("drive-mirror", device="disk0", target=self.target.uri, **args)

    def disk_bytes(self):
        return bytes(self.h.pread(self.h.get_size(), 0))

    def target_bytes(self):
        return self.target_path.read_bytes()


@pytest.fixture
def setup(servers, tmp_path, connect):
    s = Setup(servers, tmp_path, connect)
    yield s
    s.qmp.close()


SUCCESS_ORDER = ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running",
                 "JOB_STATUS_CHANGE:ready", "BLOCK_JOB_READY",
                 "JOB_STATUS_CHANGE:waiting", "JOB_STATUS_CHANGE:pending",
                 "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE:concluded", "JOB_STATUS_CHANGE:null"]


def test_full_mirror_events_match_qemu_and_disk_pivots_to_target(setup):
    setup.h.pwrite(b"overlay!" * 1000, 3 * MiB + 5)
    setup.mirror()
    ready = setup.qmp.wait_event("BLOCK_JOB_READY")
    assert ready["data"]["device"] == "disk0"
    assert ready["data"]["len"] == ready["data"]["offset"] > 0    # bytes copied, as QEMU
    info = setup.qmp.job("disk0")
    assert info["ready"] and info["status"] == "ready" and info["offset"] == info["len"]
    setup.qmp("block-job-complete", device="disk0")
    done = setup.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    setup.qmp.wait_status("disk0", "null")
    assert setup.qmp.names() == SUCCESS_ORDER
    assert setup.qmp.execute("query-block")[0]["active"] == setup.target.uri
    assert setup.disk_bytes() == setup.target_bytes()
    setup.h.pwrite(b"after pivot", 7 * MiB)                # lands in the target now
    setup.h.flush()
    with open(setup.target_path, "rb") as f:
        f.seek(7 * MiB)
        assert f.read(11) == b"after pivot"


def test_pivot_survives_restart(setup):
    setup.mirror()
    setup.qmp.wait_event("BLOCK_JOB_READY")
    setup.qmp("block-job-complete", device="disk0")
    setup.qmp.wait_status("disk0", "null")
    setup.qmp.close()
    setup.h.shutdown()
    assert setup.disk.stop() == 0
    disk = setup.servers.overlay(setup.overlay_dir, control=str(setup.ctl_path))
    h = setup.connect(disk.uri)
    h.pwrite(b"restarted", 0)
    h.flush()
    assert setup.target_bytes()[:9] == b"restarted"
    assert bytes(h.pread(SIZE, 0)) == setup.target_bytes()
    qmp = Control(setup.ctl_path)
    assert qmp.execute("query-block")[0]["active"] == setup.target.uri
    qmp.close()


def test_client_writes_during_mirror_reach_the_target(setup):
    """A writer thread does random writes through NBD during the whole job."""
    writer = Writer(setup.disk.uri, SIZE, seed=3, lengths=(512, 4096, 65536, 69999))
    writer.start()
    try:
        writer.wait_for(10)                                # writing before the job starts
        setup.mirror(granularity=4096)
        setup.qmp.wait_event("BLOCK_JOB_READY")
        writer.wait_for(20)                                # keep writing while ready
    finally:
        writer.finish()
    setup.qmp("block-job-complete", device="disk0")
    setup.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert setup.disk_bytes() == setup.target_bytes()


def test_soft_cancel_after_ready_leaves_a_point_in_time_copy(setup):
    setup.mirror()
    setup.qmp.wait_event("BLOCK_JOB_READY")
    setup.h.pwrite(b"before cancel", MiB)
    snapshot = setup.disk_bytes()
    setup.qmp("block-job-cancel", device="disk0")
    done = setup.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    setup.qmp.wait_status("disk0", "null")
    assert "BLOCK_JOB_CANCELLED" not in setup.qmp.names()
    assert setup.target_bytes() == snapshot
    assert setup.qmp.execute("query-block")[0]["active"] is None
    setup.h.pwrite(b"after cancel", MiB)                   # the overlay still serves
    assert setup.target_bytes() == snapshot


def test_cancel_before_ready_is_cancelled_without_pivot(setup):
    setup.mirror(speed=MiB)                                # 16 s to copy: cancel long before
    setup.qmp.wait_status("disk0", "running")
    setup.qmp("block-job-cancel", device="disk0")
    setup.qmp.wait_event("BLOCK_JOB_CANCELLED")
    setup.qmp.wait_status("disk0", "null")
    names = setup.qmp.names()
    assert "BLOCK_JOB_READY" not in names and "BLOCK_JOB_COMPLETED" not in names
    assert setup.qmp.execute("query-block")[0]["active"] is None


def test_forced_cancel_after_ready_is_cancelled(setup):
    setup.mirror()
    setup.qmp.wait_event("BLOCK_JOB_READY")
    setup.qmp("block-job-cancel", device="disk0", force=True)
    setup.qmp.wait_event("BLOCK_JOB_CANCELLED")
    assert "BLOCK_JOB_COMPLETED" not in setup.qmp.names()
    assert setup.qmp.execute("query-block")[0]["active"] is None


def test_manual_finalize_and_dismiss(setup):
    setup.mirror(auto_finalize=False, auto_dismiss=False)
    setup.qmp.wait_event("BLOCK_JOB_READY")
    setup.qmp("block-job-complete", device="disk0")
    setup.qmp.wait_event("BLOCK_JOB_PENDING")
    setup.h.pwrite(b"written while pending", 9 * MiB)      # must still reach the target
    setup.qmp("block-job-finalize", id="disk0")
    setup.qmp.wait_status("disk0", "concluded")
    assert setup.qmp.job("disk0")["status"] == "concluded"
    setup.qmp("block-job-dismiss", id="disk0")
    setup.qmp.wait_status("disk0", "null")
    assert setup.qmp.execute("query-block-jobs") == []
    assert setup.target_bytes()[9 * MiB:9 * MiB + 21] == b"written while pending"


def test_mirror_to_a_raw_file_path(setup, tmp_path):
    path = tmp_path / "file-target.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    setup.h.pwrite(b"file target", 123)
    setup.qmp("drive-mirror", device="disk0", target=str(path), sync="full")
    setup.qmp.wait_event("BLOCK_JOB_READY")
    setup.qmp("block-job-cancel", device="disk0")
    setup.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert path.read_bytes() == setup.disk_bytes()


def test_full_mirror_zeroes_stale_target_data(servers, tmp_path, connect):
    s = Setup(servers, tmp_path, connect, target_fill=b"\xee" * SIZE)
    s.mirror()
    s.qmp.wait_event("BLOCK_JOB_READY")
    s.qmp("block-job-cancel", device="disk0")
    s.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert s.target_bytes() == s.disk_bytes()
    s.qmp.close()


def test_sync_top_copies_only_what_the_overlay_holds(servers, tmp_path, connect):
    marker = bytearray(b"\x5a" * SIZE)                     # stands for "target already has the base"
    s = Setup(servers, tmp_path, connect, target_fill=bytes(marker))
    s.h.pwrite(b"top" * 3000, 10 * MiB)
    s.h.zero(MiB, 0)                                       # zeroes over base data: must reach target
    s.mirror(sync="top")
    s.qmp.wait_event("BLOCK_JOB_READY")
    s.qmp("block-job-cancel", device="disk0")
    s.qmp.wait_event("BLOCK_JOB_COMPLETED")
    t = s.target_bytes()
    assert t[10 * MiB:10 * MiB + 9000] == b"top" * 3000
    assert t[:MiB] == bytes(MiB)
    assert t[4 * MiB:5 * MiB] == b"\x5a" * MiB             # base-only range untouched
    s.qmp.close()


def test_sync_none_copies_only_new_writes(servers, tmp_path, connect):
    s = Setup(servers, tmp_path, connect, target_fill=b"\x5a" * SIZE)
    s.h.pwrite(b"old" * 100, 2 * MiB)
    s.mirror(sync="none")
    s.qmp.wait_event("BLOCK_JOB_READY")
    s.h.pwrite(b"new" * 100, 3 * MiB)
    s.qmp("block-job-cancel", device="disk0")
    s.qmp.wait_event("BLOCK_JOB_COMPLETED")
    t = s.target_bytes()
    assert t[3 * MiB:3 * MiB + 300] == b"new" * 100
    assert t[2 * MiB:2 * MiB + 300] == b"\x5a" * 300
    s.qmp.close()


def test_set_speed_and_query_fields(setup):
    setup.mirror(speed=MiB, job_id="m1")
    setup.qmp.wait_status("m1", "running")
    info = setup.qmp.job("m1")
    assert info["speed"] == MiB and info["type"] == "mirror" and info["io-status"] == "ok"
    assert info["len"] >= info["offset"] and not info["ready"]
    setup.qmp("block-job-set-speed", device="m1", speed=0)
    assert setup.qmp.job("m1")["speed"] == 0
    setup.qmp.wait_event("BLOCK_JOB_READY")
    jobs = setup.qmp.execute("query-jobs")
    assert jobs[0]["id"] == "m1" and jobs[0]["status"] == "ready"
    assert jobs[0]["current-progress"] == jobs[0]["total-progress"]


def test_pause_and_resume(setup):
    setup.mirror(speed=4 * MiB)
    setup.qmp.wait_status("disk0", "running")
    setup.qmp("block-job-pause", device="disk0")
    setup.qmp.wait_status("disk0", "paused")
    assert setup.qmp.job("disk0")["paused"]
    setup.qmp("block-job-set-speed", device="disk0", speed=0)
    setup.qmp("block-job-resume", device="disk0")
    setup.qmp.wait_event("BLOCK_JOB_READY")


@pytest.mark.parametrize("args, text", [
    ({"granularity": 1000}, "power of 2"),
    ({"granularity": 256}, "range"),
    ({"granularity": 128 * MiB}, "range"),
    ({"device": "nope"}, "Cannot find device='nope'"),
    ({"sync": "bogus"}, "does not accept value 'bogus'"),
    ({"target": "/nonexistent/t.img"}, "Could not open"),
    ({"speed": -1}, "non-negative"),
])
def test_bad_drive_mirror_arguments_are_refused(setup, args, text):
    from jobctl.qmp_client import QMPError
    full = {"device": "disk0", "target": setup.target.uri, "sync": "full", **args}
    with pytest.raises(QMPError) as e:
        setup.qmp.execute("drive-mirror", full)
    assert text in e.value.desc
    assert setup.qmp.execute("query-block-jobs") == []


def test_target_of_another_size_is_refused(setup, tmp_path):
    from jobctl.qmp_client import QMPError
    small = tmp_path / "small.img"
    with open(small, "wb") as f:
        f.truncate(MiB)
    with pytest.raises(QMPError) as e:
        setup.qmp("drive-mirror", device="disk0", target=str(small), sync="full")
    assert "different sizes" in e.value.desc


def test_second_job_on_the_device_is_refused(setup):
    from jobctl.qmp_client import QMPError
    setup.mirror(speed=MiB)
    with pytest.raises(QMPError) as e:
        setup.mirror(job_id="other")
    assert "is busy" in e.value.desc


def test_sigterm_during_a_running_mirror_exits_promptly(setup):
    setup.mirror(speed=MiB)
    setup.qmp.wait_status("disk0", "running")
    setup.qmp.close()
    setup.h.shutdown()
    t0 = time.monotonic()
    assert setup.disk.stop(timeout=15) == 0
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_write_blocking_converges_under_load_that_background_cannot_keep_up_with(
        servers, tmp_path, connect):
    size = 8 * MiB
    s = Setup(servers, tmp_path, connect, size=size)
    expected = bytearray(open(s.base, "rb").read())
    # Background: the copy is limited to 1 MiB/s, the writer dirties far more than that.
    w = Writer(s.disk.uri, size, seed=1, lengths=(65536,), align=65536, record=True)
    w.start()
    try:
        s.mirror(speed=MiB, job_id="bg", granularity=65536)
        # It copies one and a half disks' worth (about 11 s at its speed) and never gets
        # there, while the client writes on.
        writes = w.wait_for(10)
        s.qmp.wait_job(lambda j: j["offset"] >= 12 * MiB, job_id="bg", timeout=60)
        assert w.count > writes + 100
        assert not s.qmp.job("bg")["ready"]
        assert "BLOCK_JOB_READY" not in s.qmp.names()
        s.qmp("block-job-cancel", device="bg")
        s.qmp.wait_event("BLOCK_JOB_CANCELLED")
        s.qmp.wait_status("bg", "null")
        # Write-blocking: same speed, same load; it must become ready.
        s.mirror(speed=MiB, job_id="wb", granularity=65536, copy_mode="write-blocking")
        s.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        s.qmp("block-job-complete", device="wb")
        s.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    finally:
        w.finish()
    assert len(w.writes) > 100
    for off, data in w.writes:
        expected[off:off + len(data)] = data
    s.h.flush()
    assert s.target_bytes() == bytes(expected)
    s.qmp.close()


def test_speed_limited_mirror_copies_at_its_speed(local_disks, tmp_path):
    """speed= is a rate, not a hint.  The job runs in this process (helpers.LocalDisk) on a
    clock the test steps 10 ms at a time: at every step the copy is where the speed puts
    it, ahead by at most the rate limiter's slice (0.1 s) and the copy in flight (one
    chunk, at most 1 MiB), whatever the machine's load."""
    size, speed, chunk, slice_time = 32 * MiB, 2 * MiB, MiB, 0.1
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=2)
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(size)
    disk = local_disks(base)
    job = disk.mirror(target_path, speed=speed, granularity=65536)
    samples = []
    disk.run(12.0, on_step=lambda: samples.append((disk.now(), block_job_info(job))))
    for t, info in samples:
        assert speed * t <= info["offset"] <= speed * (t + slice_time) + chunk, (t, info)
        assert (info["speed"], info["status"], info["ready"]) == (speed, "running", False)
    rate = {round(t, 2): info["offset"] for t, info in samples}
    assert abs((rate[11.0] - rate[1.0]) / 10 - speed) <= chunk / 10          # within 5%
    # set-speed 0 lifts the limit: the rest is copied without the clock moving.
    job.user_set_speed(0)
    ready, event = disk.wait_event("BLOCK_JOB_READY")
    assert ready == samples[-1][0] and event["data"]["offset"] == size
    expected = disk.read()
    job.user_cancel()
    disk.wait_event("JOB_STATUS_CHANGE", id="disk0", status="null")
    assert target_path.read_bytes() == expected


def test_copied_bytes_count_data_written_not_zero_ranges(servers, tmp_path, connect):
    # A target that does not read as zeros: the zero ranges are zeroed there,
    # which counts as progress (offset) but is not data copied (x-copied-bytes).
    s = Setup(servers, tmp_path, connect, target_fill=b"\xff" * SIZE)
    try:
        s.mirror()
        ready = s.qmp.wait_event("BLOCK_JOB_READY")["data"]
        info = s.qmp.job("disk0")
        data = sum(n for _, n in [(0, 2 * MiB), (0, SIZE // 6), (0, MiB)])
        assert data <= info["x-copied-bytes"] < SIZE <= ready["offset"]
        s.qmp("block-job-cancel", device="disk0")
        s.qmp.wait_status("disk0", "null")
        assert s.disk_bytes() == s.target_bytes()
    finally:
        s.qmp.close()


def test_a_deferred_intent_set_is_durable_before_the_target_or_a_commit_gets_the_change(
        local_disks, tmp_path):
    """A background mirror's first write into a clear region of fresh overlay space
    defers the intent log's fdatasync (IntentLog.defer): the change cannot be durable
    before the store's next commit.  The sync must come before the target is sent
    anything (the copy pipeline's before_send) and before that commit (its hook)."""
    from plugin.blockcopy.intent import IntentLog
    size = 64 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=3)
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(size)
    disk = local_disks(base)
    intent = IntentLog(str(tmp_path / "disk0.intent"), size, MiB, create=True)
    job = disk.mirror(target_path, granularity=65536, intent=intent)
    disk.wait_event("BLOCK_JOB_READY")

    def cleared():
        disk.run(5.0, until=lambda: intent.set_bytes() == 0)    # checkpoints clear it
        assert intent.set_bytes() == 0
    cleared()
    sent_while_owed = []
    target = job.copy.target
    for name in ("submit_write", "submit_zero", "submit_copy"):
        real = getattr(target, name)

        def spy(*args, _real=real):
            sent_while_owed.append(intent.owed)
            return _real(*args)
        setattr(target, name, spy)
    for i in range(4):                          # fresh clusters in 4 of the 8 MiB groups
        disk.disk.write(bytearray(b"%d" % i * 4096), i * 8 * MiB + 8192)
    assert intent.deferred_sets == 4 and intent.sets == 0 and intent.owed
    disk.run(1.0, until=lambda: job.copy.bitmap.is_clean() and not target.in_flight())
    assert sent_while_owed and not any(sent_while_owed)
    assert not intent.owed                      # the copy synced it first
    disk.disk.write(bytearray(b"x" * 4096), 40 * MiB + 8192)    # a clear group: owed
    assert intent.owed
    disk.disk.flush()                           # the commit's hook syncs it
    assert not intent.owed
    # A change into a committed cluster of an owed region syncs first.
    cleared()
    disk.disk.write(bytearray(b"y" * 4096), 41 * MiB)           # fresh, group 5: owed
    assert intent.owed
    disk.disk.write(bytearray(b"z" * 4096), 40 * MiB + 4096)    # committed cluster
    assert not intent.owed
    expected = disk.read()
    job.user_cancel()
    disk.wait_event("JOB_STATUS_CHANGE", id="disk0", status="null")
    assert target_path.read_bytes() == expected
