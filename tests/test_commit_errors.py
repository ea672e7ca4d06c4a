"""block-commit's on-error against a base that fails writes: the base is an NBD export
(nbdkit's file plugin) behind nbdkit's error filter, switched on and off with a file
(tests/faults.py).  Every error emits BLOCK_JOB_ERROR {device, operation: write,
action}; the overlay stays whole whatever happens, so the disk never changes."""

import time

import pytest

from commit_rig import CommitRig, MiB
from faults import FaultSwitch, PauseControl, error_args, injected, wait_until
from plugin.jobs.copyjob import FINAL_SYNC_TIMEOUT


@pytest.fixture
def failing(servers, tmp_path):
    """A rig whose base fails writes and zeroes with `error` while its switch is on."""
    made = []

    def make(error="EIO", on=True):
        switch = FaultSwitch(tmp_path / "fault", on=on)
        rig = CommitRig(servers, tmp_path, "nbdkit", size=8 * MiB, base_filters=["error"],
                        base_args=error_args(switch, error=error))
        rig.fill_overlay()
        rig.switch = switch
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.qmp.close()


def errors(rig):
    return [{k: v for k, v in e["data"].items() if not k.startswith("x-")}
            for e in rig.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]


def _completes(rig):
    """Faults off: the job becomes ready, complete leaves the base equal to the disk."""
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert "error" not in done
    assert rig.base_bytes() == expected == rig.disk_bytes()
    alloc = rig.allocation()
    assert alloc["absent-clusters"] == alloc["clusters"]


@pytest.mark.parametrize("policy,error", [("report", "EIO"), ("enospc", "EIO"),
                                          ("auto", "EIO")])
def test_report_ends_the_job_and_leaves_the_overlay_whole(failing, policy, error):
    rig = failing(error)
    before, alloc = rig.disk_bytes(), rig.allocation()
    rig.commit(on_error=policy)
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert done["type"] == "commit" and done["error"] == "Input/output error"
    assert errors(rig) == [{"device": "disk0", "operation": "write", "action": "report"}]
    rig.qmp.wait_status("disk0", "null")
    assert rig.disk_bytes() == before and rig.allocation() == alloc
    assert rig.records() == {}
    rig.stop()
    rig.restart()
    assert rig.disk_bytes() == before


@pytest.mark.parametrize("policy,error,io_status", [("stop", "EIO", "failed"),
                                                    ("stop", "ENOSPC", "nospace"),
                                                    ("enospc", "ENOSPC", "nospace"),
                                                    ("auto", "ENOSPC", "nospace")])
def test_stop_pauses_with_its_io_status_and_resume_goes_on(failing, policy, error, io_status):
    rig = failing(error)
    before = rig.disk_bytes()
    rig.commit(on_error=policy)
    rig.qmp.wait_status("disk0", "paused")
    job = rig.qmp.job("disk0")
    assert job["io-status"] == io_status and job["paused"]
    assert job["x-last-error"]["operation"] == "write"
    assert errors(rig)[0] == {"device": "disk0", "operation": "write", "action": "stop"}
    assert rig.records()["disk0"]["io-status"] == io_status
    assert rig.disk_bytes() == before
    rig.switch.off()
    rig.qmp("block-job-resume", device="disk0")
    assert rig.qmp.job("disk0")["io-status"] == "ok"
    _completes(rig)


def test_ignore_retries_until_the_base_takes_writes_again(failing):
    rig = failing()
    rig.commit(on_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_ERROR", operation="write", action="ignore")
    wait_until(lambda: injected(rig.base_server) >= 3)
    rig.qmp.drain(0.2)
    assert {e["action"] for e in errors(rig)} == {"ignore"}
    assert rig.qmp.job("disk0")["status"] == "running"
    rig.switch.off()
    _completes(rig)


def test_stop_while_ready_goes_to_standby(failing):
    rig = failing(on=False)
    rig.commit(on_error="stop")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.switch.on()
    rig.h.pwrite(b"R" * 65536, 2 * MiB)
    rig.qmp.wait_status("disk0", "standby")
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.switch.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_status("disk0", "ready")
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.base_bytes() == expected


@pytest.mark.slow
def test_complete_against_a_base_that_stops_answering_fails_with_the_overlay_whole(
        servers, tmp_path):
    """complete ends in bounded time (FINAL_SYNC_TIMEOUT) whatever the base does; a job
    that fails while completing leaves the overlay whole, so the disk never changed."""
    control = PauseControl(tmp_path / "pause.sock")
    rig = CommitRig(servers, tmp_path, "nbdkit", size=8 * MiB, base_filters=["pause"],
                    base_args=["pause-control=%s" % control.path])
    try:
        rig.fill_overlay()
        rig.commit(on_error="ignore")
        rig.qmp.wait_event("BLOCK_JOB_READY")
        expected = bytearray(rig.disk_bytes())
        expected[3 * MiB:3 * MiB + 65536] = b"C" * 65536
        control.pause()                              # the base answers nothing from now on
        rig.h.pwrite(b"C" * 65536, 3 * MiB)          # a whole cluster: no read of the base
        rig.h.flush()
        alloc = rig.allocation()
        t0 = time.monotonic()
        rig.qmp("block-job-complete", device="disk0")
        done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)["data"]
        took = time.monotonic() - t0
        assert done["error"] == "Connection timed out"
        assert took < FINAL_SYNC_TIMEOUT + 10, took
        assert errors(rig)[-1]["action"] == "report"
        rig.qmp.wait_status("disk0", "null")
        assert rig.allocation() == alloc and rig.records() == {}
        control.resume()
        assert rig.disk_bytes() == expected
    finally:
        control.resume()
        rig.qmp.close()
