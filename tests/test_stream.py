"""The stream job (block-stream): base copied into the overlay, base dropped, as QEMU's stream.

Every test drives a real nbdkit serving the overlay through its QMP control
socket.  The error tests port the intent of QEMU's iotests 030 TestEIO and
TestENOSPC: the base is an NBD export behind nbdkit's error filter, whose
faults are switched on and off with a file.
"""

import os
import shutil
import threading
import time

import pytest

from conftest import make_image
from faults import wait_until
from helpers import Control, Writer
from jobctl.qmp_client import QMPError
from plugin.qmp.job_info import block_job_info

MiB = 1 << 20
CS = 64 * 1024
SIZE = 16 * MiB


# --- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def sessions():
    opened = []

    def _open(path):
        s = Control(path)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


@pytest.fixture
def base(tmp_path):
    """16 MiB base with data in three places (none in the first 4 MiB), holes elsewhere."""
    return make_image(tmp_path / "base.img", SIZE,
                      [(4 * MiB, MiB), (9 * MiB + 12345, 300000), (15 * MiB, MiB)], seed=1)


def start(servers, tmp_path, base, **params):
    """The overlay disk on `base` with its control socket: (server, control path).

    Each start gets its own control socket, so a restart never finds a stale one.
    """
    n = 1
    while (tmp_path / ("ctl%d.sock" % n)).exists() or (tmp_path / ("ctl%d.used" % n)).exists():
        n += 1
    (tmp_path / ("ctl%d.used" % n)).touch()
    ctl = tmp_path / ("ctl%d.sock" % n)
    srv = servers.overlay(tmp_path / "ov", base=base, control=str(ctl), **params)
    deadline = time.monotonic() + 10
    while not ctl.exists():
        assert time.monotonic() < deadline, "no control socket:\n" + srv.log()
        time.sleep(0.02)
    return srv, ctl


def read_all(connect, uri, size=SIZE):
    h = connect(uri, meta=False)
    return b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def faulty_base(servers, tmp_path, base, error="EIO"):
    """The base over NBD through nbdkit's error filter: preads fail while the fault file exists."""
    fault = tmp_path / "fault"
    srv = servers.nbdkit("file", base, "error-pread=%s" % error, "error-pread-rate=100%",
                         "error-pread-file=%s" % fault, filters=["error"])
    return srv, fault


# --- the successful stream -------------------------------------------------------------------

def test_stream_copies_base_into_overlay_and_drops_base(servers, tmp_path, base, sessions, connect):
    srv, ctl = start(servers, tmp_path, base)
    h = connect(srv.uri, meta=False)
    h.pwrite(b"\x5a" * 1000, 4 * MiB + 100)
    expected = bytearray(file_bytes(base))
    expected[4 * MiB + 100:4 * MiB + 1100] = b"\x5a" * 1000
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert done == {"type": "stream", "device": "disk0", "len": SIZE, "offset": SIZE, "speed": 0}
    info = qmp.block()
    assert info["base"] is None
    assert info["allocation"]["absent-clusters"] == 0
    assert read_all(connect, srv.uri) == bytes(expected)


def test_stream_emits_qemus_event_sequence(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", job_id="s1")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="s1")
    qmp.wait_event("JOB_STATUS_CHANGE", id="s1", status="null")
    assert qmp.statuses("s1") == ["created", "running", "waiting", "pending", "concluded",
                                  "null"]


def test_streamed_overlay_restarts_without_base(servers, tmp_path, base, sessions, connect):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")
    qmp.close()
    srv.stop()
    expected = file_bytes(base)
    os.unlink(base)
    srv2, ctl2 = start(servers, tmp_path, base=None)
    assert sessions(ctl2).block()["base"] is None
    assert read_all(connect, srv2.uri) == expected


def test_stream_skips_clusters_the_overlay_holds(servers, tmp_path, base, sessions, connect):
    srv, ctl = start(servers, tmp_path, base)
    h = connect(srv.uri, meta=False)
    mine = os.urandom(MiB)
    h.pwrite(mine, 15 * MiB)
    h.flush()
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    assert qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]["offset"] == SIZE
    assert h.pread(MiB, 15 * MiB) == mine


def test_stream_of_fully_held_overlay_just_drops_base(servers, tmp_path, base, sessions, connect):
    srv, ctl = start(servers, tmp_path, base)
    h = connect(srv.uri, meta=False)
    data = os.urandom(SIZE)
    h.pwrite(data, 0)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    assert qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]["offset"] == SIZE
    assert qmp.block()["base"] is None
    assert h.pread(SIZE, 0) == data


def test_stream_from_nbd_base(servers, tmp_path, base, sessions, connect):
    nbd_base = servers.nbdkit("file", base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    assert "error" not in qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    nbd_base.stop()
    assert read_all(connect, srv.uri) == file_bytes(base)


# --- refusals ---------------------------------------------------------------------------------

def test_stream_refused_without_base(servers, tmp_path, sessions):
    srv, ctl = start(servers, tmp_path, base=None, size=SIZE)
    with pytest.raises(QMPError, match="Device 'disk0' has no backing file"):
        sessions(ctl)("block-stream", device="disk0")


def test_stream_refused_after_base_was_dropped(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")
    with pytest.raises(QMPError, match="has no backing file"):
        qmp("block-stream", device="disk0")


def test_stream_refused_after_mirror_pivot(servers, tmp_path, base, sessions):
    target = make_image(tmp_path / "target.img", SIZE)
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("drive-mirror", device="disk0", target=target, sync="full")
    qmp.wait_event("BLOCK_JOB_READY", device="disk0")
    qmp("block-job-complete", device="disk0")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")
    with pytest.raises(QMPError, match="has no backing file"):
        qmp("block-stream", device="disk0")


def test_stream_refuses_a_base_not_in_the_chain(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    with pytest.raises(QMPError, match="Can't find '/nope.img' in the backing chain"):
        sessions(ctl)("block-stream", device="disk0", base="/nope.img")


def test_stream_accepts_its_own_base_by_name(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", base=qmp.block()["base"])
    assert "error" not in qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]


def test_stream_refuses_unknown_device(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    with pytest.raises(QMPError, match="Cannot find device='nope'"):
        sessions(ctl)("block-stream", device="nope")


def test_stream_refuses_negative_speed(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    with pytest.raises(QMPError, match="non-negative"):
        qmp("block-stream", device="disk0", speed=-1)
    assert qmp("query-block-jobs") == []


def test_second_stream_on_busy_device_is_refused(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", speed=CS)
    with pytest.raises(QMPError, match="Node 'disk0' is busy: block device is in use by "
                                       "block job: stream"):
        qmp("block-stream", device="disk0", job_id="other")


# --- speed, pause, cancel, finalize -----------------------------------------------------------

def test_speed_limits_progress_and_set_speed_lifts_it(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", speed=256 * 1024)
    info = qmp.wait_job(lambda j: j["offset"] > 4 * MiB)
    assert info["speed"] == 256 * 1024 and info["len"] == SIZE
    assert qmp.job()["offset"] < SIZE
    qmp("block-job-set-speed", device="disk0", speed=0)
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0", timeout=10)["data"]
    assert done["offset"] == SIZE and done["speed"] == 0


def test_stream_copies_at_its_speed(local_disks, tmp_path):
    """The stream in this process (helpers.LocalDisk) on a clock the test steps: at every
    step the copy is where its speed puts it, ahead by at most the rate limiter's slice
    (0.1 s) and one chunk (1 MiB), whatever the machine's load."""
    speed, chunk, slice_time = MiB, MiB, 0.1
    base = make_image(tmp_path / "full.img", SIZE, [(0, SIZE)], seed=6)
    disk = local_disks(base)
    job = disk.stream(speed=speed)
    samples = []
    disk.run(10.0, on_step=lambda: samples.append((disk.now(), block_job_info(job))))
    for t, info in samples:
        assert speed * t <= info["offset"] <= speed * (t + slice_time) + chunk, (t, info)
        assert (info["speed"], info["status"], info["len"]) == (speed, "running", SIZE)
    # set-speed 0 lifts the limit: the rest is copied without the clock moving.
    job.user_set_speed(0)
    t, event = disk.wait_event("BLOCK_JOB_COMPLETED")
    assert t == samples[-1][0] and event["data"]["offset"] == SIZE
    assert disk.service.base_address() is None
    assert disk.read() == file_bytes(base)


def test_pause_holds_progress_and_resume_completes(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", speed=256 * 1024)
    qmp.wait_job(lambda j: j["offset"] > 0)
    qmp("block-job-pause", device="disk0")
    paused = qmp.wait_job(lambda j: j["status"] == "paused")
    assert paused["paused"] is True and paused["busy"] is False
    time.sleep(0.3)
    assert qmp.job()["offset"] == paused["offset"]
    qmp("block-job-set-speed", device="disk0", speed=0)
    qmp("block-job-resume", device="disk0")
    assert qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]["offset"] == SIZE
    assert qmp.block()["base"] is None


def test_cancel_keeps_base_and_disk_content(servers, tmp_path, base, sessions, connect):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", speed=256 * 1024)
    qmp.wait_job(lambda j: j["offset"] > 0)
    qmp("block-job-cancel", device="disk0")
    cancelled = qmp.wait_event("BLOCK_JOB_CANCELLED", device="disk0")["data"]
    assert cancelled["offset"] < SIZE
    assert qmp.block()["base"] == base
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_stream_without_auto_finalize_drops_base_on_finalize(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", auto_finalize=False, auto_dismiss=False)
    qmp.wait_event("BLOCK_JOB_PENDING", id="disk0")
    assert qmp.block()["base"] == base
    qmp("job-finalize", id="disk0")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")
    assert qmp.block()["base"] is None
    assert qmp.job()["status"] == "concluded"
    qmp("job-dismiss", id="disk0")
    assert qmp("query-block-jobs") == []


def test_cancel_while_pending_keeps_base(servers, tmp_path, base, sessions):
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", auto_finalize=False)
    qmp.wait_event("BLOCK_JOB_PENDING", id="disk0")
    qmp("job-cancel", id="disk0")
    qmp.wait_event("BLOCK_JOB_CANCELLED", device="disk0")
    assert qmp.block()["base"] == base


# --- error policies (iotests 030 TestEIO / TestENOSPC) ----------------------------------------

def test_read_error_with_report_ends_job_where_it_stopped_and_keeps_base(
        servers, tmp_path, base, sessions, connect):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"] == {
        "device": "disk0", "operation": "read", "action": "report",
        "x-errno": "EIO", "x-desc": "Input/output error"}
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert done["error"] == "Input/output error"
    assert done["offset"] == 4 * MiB          # the first chunk with base data
    assert qmp.block()["base"] == nbd_base.uri
    fault.unlink()
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_read_error_with_ignore_goes_on_to_the_end_and_keeps_base(
        servers, tmp_path, base, sessions, connect):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="ignore")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "ignore"
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert done["error"] == "Input/output error"
    assert done["offset"] == done["len"] == SIZE
    info = qmp.block()
    assert info["base"] == nbd_base.uri
    assert info["allocation"]["absent-clusters"] > 0
    fault.unlink()
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_stream_after_ignored_fault_clears_completes_and_drops_base(
        servers, tmp_path, base, sessions, connect):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="ignore")
    assert "error" in qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    fault.unlink()
    qmp("block-stream", device="disk0", on_error="ignore")
    assert "error" not in qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert qmp.block()["base"] is None
    nbd_base.stop()
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_read_error_with_stop_pauses_failed_and_resume_completes(
        servers, tmp_path, base, sessions, connect):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="stop")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "stop"
    info = qmp.wait_job(lambda j: j["status"] == "paused")
    assert info["io-status"] == "failed" and info["paused"] is True
    assert info["offset"] == 4 * MiB
    fault.unlink()
    qmp("block-job-resume", device="disk0")
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert "error" not in done and done["offset"] == SIZE
    assert qmp.block()["base"] is None
    nbd_base.stop()
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_stop_retries_the_failed_chunk_while_the_fault_persists(servers, tmp_path, base, sessions):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="stop")
    qmp.wait_job(lambda j: j["status"] == "paused")
    qmp("block-job-resume", device="disk0")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "stop"
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "stop"
    info = qmp.wait_job(lambda j: j["status"] == "paused")
    assert info["io-status"] == "failed" and info["offset"] == 4 * MiB


def test_enospc_with_enospc_policy_pauses_nospace_and_resume_completes(
        servers, tmp_path, base, sessions, connect):
    nbd_base, fault = faulty_base(servers, tmp_path, base, error="ENOSPC")
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="enospc")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "stop"
    info = qmp.wait_job(lambda j: j["status"] == "paused")
    assert info["io-status"] == "nospace"
    fault.unlink()
    qmp("block-job-resume", device="disk0")
    assert "error" not in qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert qmp.block()["base"] is None
    nbd_base.stop()
    assert read_all(connect, srv.uri) == file_bytes(base)


def test_eio_with_enospc_policy_is_reported(servers, tmp_path, base, sessions):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="enospc")
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "report"
    done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")["data"]
    assert done["error"] == "Input/output error"
    assert qmp.block()["base"] == nbd_base.uri


def test_cancel_while_stopped_on_error_keeps_base(servers, tmp_path, base, sessions):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    fault.touch()
    qmp("block-stream", device="disk0", on_error="stop")
    qmp.wait_job(lambda j: j["status"] == "paused")
    qmp("block-job-cancel", device="disk0", force=True)
    qmp.wait_event("BLOCK_JOB_CANCELLED", device="disk0")
    assert qmp.block()["base"] == nbd_base.uri


def test_block_job_change_switches_on_error_of_a_running_stream(servers, tmp_path, base, sessions):
    nbd_base, fault = faulty_base(servers, tmp_path, base)
    srv, ctl = start(servers, tmp_path, nbd_base.uri)
    qmp = sessions(ctl)
    qmp("block-stream", device="disk0", on_error="report", speed=CS)
    qmp("block-job-change", id="disk0", type="stream", on_error="stop")
    fault.touch()
    qmp("block-job-set-speed", device="disk0", speed=0)
    assert qmp.wait_event("BLOCK_JOB_ERROR", device="disk0")["data"]["action"] == "stop"
    assert qmp.wait_job(lambda j: j["status"] == "paused")["io-status"] == "failed"


# --- no lost writes ---------------------------------------------------------------------------

class SliceWriter(Writer):
    """Partial writes and reads in its own slice of every cluster, checked as it goes.

    Slices of different writers share clusters but never bytes, so the final
    content is known whatever the interleaving: base plus every writer's
    writes in its own order (kept in the shared `expected`).  A mismatch
    stops every writer sharing `stop`; finish() raises it.
    """

    def __init__(self, uri, index, count, expected, stop, cluster_size, nclusters):
        super().__init__(uri, seed=index, pace=0, stop=stop)
        self.index, self.expected = index, expected
        self.slice = cluster_size // count
        self.cs, self.nclusters = cluster_size, nclusters
        self.writes = self.reads = 0

    def step(self):
        cluster = self.rnd.randrange(self.nclusters)
        lo = cluster * self.cs + self.index * self.slice
        if self.rnd.random() < 0.6:
            off = lo + self.rnd.randrange(self.slice - 1)
            n = self.rnd.randint(1, lo + self.slice - off)
            data = self.rnd.randbytes(n)
            self.h.pwrite(data, off)
            self.expected[off:off + n] = data
            self.writes += 1
            self._check(self.h.pread(n, off), data, off)
        else:
            whole = self.h.pread(self.cs, cluster * self.cs)
            mine = whole[self.index * self.slice:(self.index + 1) * self.slice]
            self._check(mine, bytes(self.expected[lo:lo + self.slice]), lo)
            self.reads += 1

    def _check(self, got, want, off):
        assert got == want, "writer %d: bytes at %d differ from what was written" % (
            self.index, off)


def test_concurrent_partial_writes_are_never_overwritten_by_the_stream(
        servers, tmp_path, sessions, connect):
    size = 32 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=3)
    slow = servers.nbdkit("file", base, "rdelay=5ms", filters=["delay"])
    srv, ctl = start(servers, tmp_path, slow.uri)
    expected = bytearray(file_bytes(base))
    stop = threading.Event()
    writers = [SliceWriter(srv.uri, i, 4, expected, stop, CS, size // CS) for i in range(4)]
    for w in writers:
        w.start()
    qmp = sessions(ctl)
    try:
        for w in writers:
            w.wait_for(10)
        # Slow at first (32 s for the disk at this speed), so that all these writes
        # and reads race the copy whatever the machine's load; then at full speed.
        qmp("block-stream", device="disk0", speed=MiB)
        qmp.wait_job(lambda j: j["offset"] > 0)
        writes, reads = sum(w.writes for w in writers), sum(w.reads for w in writers)
        wait_until(lambda: sum(w.writes for w in writers) - writes > 500
                   and sum(w.reads for w in writers) - reads > 100, timeout=30, interval=0.01)
        info = qmp.job()
        assert info["status"] == "running" and info["offset"] < size    # still copying
        qmp("block-job-set-speed", device="disk0", speed=0)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120, device="disk0")["data"]
        for w in writers:
            w.wait_for(20)              # writes keep going across the drop of the base
    finally:
        for w in writers:
            w.finish()
    assert "error" not in done
    assert qmp.block()["base"] is None
    slow.stop()
    assert read_all(connect, srv.uri, size) == bytes(expected)


# --- a real guest writing during a stream -----------------------------------------------------

@pytest.mark.guest
@pytest.mark.slow
def test_guest_writes_during_stream_all_survive(servers, tmp_path, sessions, connect,
                                                guest_image):
    import guest
    image = guest_image
    size = 64 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=4)
    srv, ctl = start(servers, tmp_path, base)
    qmp = sessions(ctl)
    with guest.start_guest(srv.sock, {"mode": "writeloop", "seconds": 12, "seed": 5},
                           image=image, log_path=tmp_path / "guest.log") as g:
        g.wait_for_writes(20)
        qmp("block-stream", device="disk0", speed=4 * MiB)     # 16 s for 64 MiB
        g.wait_for_writes(40, timeout=90)
        # The guest wrote 20 more times while the stream copied (an event, not a count
        # over time: a slow host writes fewer times in 12 s).
        assert qmp("query-block-jobs"), "the stream ended before the guest wrote 20 times"
        qmp("block-job-set-speed", device="disk0", speed=0)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0", timeout=120)["data"]
        result = g.wait()
    result.raise_if_failed()
    assert "error" not in done
    assert qmp.block()["base"] is None
    assert len(result.writes) >= 40
    qmp.close()
    srv.stop()
    shutil.move(base, base + ".gone")
    srv2, _ = start(servers, tmp_path, base=None)
    assert guest.check_writes(result, srv2.uri) == []
