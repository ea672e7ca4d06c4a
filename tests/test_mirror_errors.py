"""The mirror's error policies (SPEC 4) against failing, restarting and stalled targets.

Ports the intent of QEMU's iotests 041 (TestReadErrors, TestWriteErrors: report, ignore
and stop for reads of the source and writes to the target), 248 (ENOSPC on the target,
the enospc policy, resume once space appears) and 229 (force cancel of a job paused on an
error).  Faults come from real tools: nbdkit's error filter (switched on and off at run
time through its error-file), its delay and pause filters, and qemu-nbd over QEMU's
blkdebug driver for one error at one exact offset.  Each test asserts the events, the
job's status and io-status, and that the target ends equal to the source.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_image
from faults import (MiB, FaultSwitch, MirrorRig, PauseControl, bad_sector_server,
                    blkdebug_server, error_args, flaky_flush_server, injected, restart,
                    wait_until)
from plugin.qmp.job_info import block_job_info

IO_ERROR = "Input/output error"

FAILED_ORDER = ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running", "BLOCK_JOB_ERROR",
                "JOB_STATUS_CHANGE:aborting", "BLOCK_JOB_COMPLETED",
                "JOB_STATUS_CHANGE:concluded", "JOB_STATUS_CHANGE:null"]
COMPLETION = ["JOB_STATUS_CHANGE:waiting", "JOB_STATUS_CHANGE:pending", "BLOCK_JOB_COMPLETED",
              "JOB_STATUS_CHANGE:concluded", "JOB_STATUS_CHANGE:null"]


def error_event(operation, action):
    return {"device": "disk0", "operation": operation, "action": action}


def qemu_fields(data):
    """The members QEMU's BLOCK_JOB_ERROR has (ours adds x-errno and x-desc)."""
    return {k: v for k, v in data.items() if not k.startswith("x-")}


@pytest.fixture
def rigs(servers, tmp_path, connect):
    made = []

    def make(**kwargs):
        rig = MirrorRig(servers, tmp_path, connect, **kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def fault(tmp_path):
    return FaultSwitch(tmp_path / "fault")


def target_fault_rig(rigs, fault, error="EIO", **kwargs):
    """A rig whose target fails writes and zeroes with `error` while `fault` is on."""
    return rigs(target_filters=["error"], target_args=error_args(fault, error), **kwargs)


def source_fault_rig(rigs, fault, **kwargs):
    """A rig whose base (served over NBD) fails reads while `fault` is on."""
    return rigs(base_filters=["error"], base_args=error_args(fault, ops=("pread",)), **kwargs)


def complete_and_check(rig, expected=None):
    """Complete a ready job, wait for it to end, and check the target is the source."""
    if expected is None:
        expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.execute("query-block")[0]["active"] == rig.target.uri
    assert rig.target_bytes() == expected


def assert_failed_without_pivot(rig, operation, before):
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert done["data"]["error"] == IO_ERROR
    assert done["data"]["type"] == "mirror" and done["data"]["device"] == "disk0"
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.names() == FAILED_ORDER
    assert rig.errors() == [error_event(operation, "report")]
    assert rig.qmp.execute("query-block")[0]["active"] is None
    # (the null event goes out just before the job leaves the registry)
    wait_until(lambda: rig.qmp.execute("query-block-jobs") == [], timeout=5)
    assert rig.disk_bytes() == before                      # the served disk is untouched
    rig.h.pwrite(b"still served", MiB)
    assert rig.h.pread(12, MiB) == b"still served"


# --- writes to the target (041 TestWriteErrors) -------------------------------------------

def test_report_on_target_error_ends_the_job_with_the_error_and_no_pivot(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    before = rig.disk_bytes()
    fault.on()
    rig.mirror()
    assert_failed_without_pivot(rig, "write", before)


def test_ignore_on_target_error_retries_until_the_fault_clears_then_completes(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    fault.on()
    rig.mirror(on_target_error="ignore")
    first = rig.qmp.wait_event("BLOCK_JOB_ERROR")
    assert qemu_fields(first["data"]) == error_event("write", "ignore")
    info = rig.qmp.job("disk0")
    assert (info["status"], info["paused"], info["io-status"]) == ("running", False, "ok")
    time.sleep(0.5)
    assert not rig.qmp.job("disk0")["ready"]
    fault.off()
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert set(map(str, rig.errors())) == {str(error_event("write", "ignore"))}
    assert "JOB_STATUS_CHANGE:paused" not in rig.qmp.names()


def test_stop_on_target_error_pauses_with_io_status_failed_and_resume_retries(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    fault.on()
    rig.mirror(on_target_error="stop")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "paused")
    info = rig.qmp.job("disk0")
    assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "failed")
    # The disk keeps serving clients while the job is stopped.
    rig.h.pwrite(b"written while stopped", 3 * MiB + 100)
    assert rig.h.pread(21, 3 * MiB + 100) == b"written while stopped"
    rig.qmp.drain()
    assert len(rig.errors()) == 1                          # stopped: nothing retried
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    info = rig.qmp.job("disk0")
    assert (info["paused"], info["io-status"]) == (False, "ok")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert rig.target_bytes()[3 * MiB + 100:3 * MiB + 121] == b"written while stopped"
    assert rig.qmp.names() == [
        "JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running", "BLOCK_JOB_ERROR",
        "JOB_STATUS_CHANGE:paused", "JOB_STATUS_CHANGE:running", "JOB_STATUS_CHANGE:ready",
        "BLOCK_JOB_READY"] + COMPLETION


def test_stop_on_target_error_after_ready_moves_to_standby(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    rig.mirror(on_target_error="stop")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    fault.on()
    rig.h.pwrite(b"new data" * 512, 2 * MiB)              # its copy fails
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "standby")
    info = rig.qmp.job("disk0")
    assert (info["status"], info["paused"], info["io-status"], info["ready"]) == (
        "standby", True, "failed", True)
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_status("disk0", "ready")
    complete_and_check(rig)


def test_ignore_keeps_a_ready_job_ready_and_copies_once_the_fault_clears(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    rig.mirror(on_target_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    fault.on()
    rig.h.pwrite(b"late" * 1024, MiB + 512)
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "ignore")
    info = rig.qmp.job("disk0")
    assert (info["status"], info["io-status"]) == ("ready", "ok")
    assert info["offset"] < info["len"]                    # the failed copy is still to do
    fault.off()
    wait_until(lambda: (lambda i: i["offset"] == i["len"])(rig.qmp.job("disk0")), timeout=10)
    complete_and_check(rig)


@pytest.fixture
def stall(tmp_path):
    return FaultSwitch(tmp_path / "stall")


@pytest.fixture
def flush_fault_rig(rigs, servers, tmp_path, fault, stall):
    """The target's flushes fail while `fault` is on and hang while `stall` is on."""
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(4 * MiB)
    return rigs(target_server=flaky_flush_server(servers, target, fault, stall))


def test_failed_target_flush_under_report_fails_the_job(flush_fault_rig, fault):
    rig = flush_fault_rig
    before = rig.disk_bytes()
    fault.on()
    rig.mirror()
    assert_failed_without_pivot(rig, "write", before)


def test_failed_target_flush_under_stop_pauses_and_resume_copies_again(flush_fault_rig, fault):
    rig = flush_fault_rig
    fault.on()
    rig.mirror(on_target_error="stop")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "paused")
    info = rig.qmp.job("disk0")
    # Nothing written since the last good flush is trusted: all of it is to do again.
    assert (info["io-status"], info["offset"]) == ("failed", 0)
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert rig.errors() == [error_event("write", "stop")]


def test_write_blocking_client_write_that_fails_on_the_target_is_ignored_then_copied(
        rigs, fault):
    rig = target_fault_rig(rigs, fault)
    rig.mirror(on_target_error="ignore", copy_mode="write-blocking")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    fault.on()
    rig.h.pwrite(b"through" * 1000, 2 * MiB + 7)         # the client's write still succeeds
    assert rig.h.pread(7, 2 * MiB + 7) == b"through"
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "ignore")
    assert rig.qmp.job("disk0")["status"] == "ready"
    fault.off()
    wait_until(lambda: (lambda i: i["offset"] == i["len"])(rig.qmp.job("disk0")), timeout=10)
    complete_and_check(rig)


def test_write_blocking_client_write_that_fails_on_the_target_stops_the_job(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    rig.mirror(on_target_error="stop", copy_mode="write-blocking")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    fault.on()
    rig.h.pwrite(b"first" * 1000, MiB)
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "standby")
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.h.pwrite(b"while stopped" * 100, 3 * MiB)         # not written through while stopped
    rig.qmp.drain()
    assert len(rig.errors()) == 1
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_status("disk0", "ready")
    complete_and_check(rig)


# --- reads of the source (041 TestReadErrors) ---------------------------------------------

def test_report_on_source_error_ends_the_job_with_the_error(rigs, fault):
    rig = source_fault_rig(rigs, fault)
    before = rig.disk_bytes()
    fault.on()
    rig.mirror()
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert done["data"]["error"] == IO_ERROR
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.names() == FAILED_ORDER
    assert rig.errors() == [error_event("read", "report")]
    fault.off()
    assert rig.qmp.execute("query-block")[0]["active"] is None
    assert rig.disk_bytes() == before


def test_ignore_on_source_error_retries_until_the_fault_clears(rigs, fault):
    rig = source_fault_rig(rigs, fault)
    expected = rig.disk_bytes()
    fault.on()
    rig.mirror(on_source_error="ignore")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("read", "ignore")
    assert rig.qmp.job("disk0")["paused"] is False
    time.sleep(0.3)
    fault.off()
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig, expected)


def test_stop_on_source_error_pauses_and_resume_retries(rigs, fault):
    rig = source_fault_rig(rigs, fault)
    expected = rig.disk_bytes()
    fault.on()
    rig.mirror(on_source_error="stop")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("read", "stop")
    rig.qmp.wait_status("disk0", "paused")
    info = rig.qmp.job("disk0")
    assert (info["paused"], info["io-status"]) == (True, "failed")
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    info = rig.qmp.job("disk0")
    assert (info["paused"], info["io-status"]) == (False, "ok")
    complete_and_check(rig, expected)


# --- one error at one exact offset (blkdebug) ----------------------------------------------

@pytest.fixture
def blkdebug_target_rig(rigs, servers, tmp_path):
    def make(offset=MiB + 65536):
        target = tmp_path / "target.img"
        with open(target, "wb") as f:
            f.truncate(4 * MiB)
        server = blkdebug_server(servers, target, tmp_path, "write_aio", offset)
        return rigs(target_server=server)
    return make


def test_one_write_error_under_ignore_is_one_event_and_the_copy_completes(blkdebug_target_rig):
    rig = blkdebug_target_rig()
    rig.mirror(on_target_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert rig.errors() == [error_event("write", "ignore")]


def test_one_write_error_under_stop_pauses_once_and_resume_completes(blkdebug_target_rig):
    rig = blkdebug_target_rig()
    rig.mirror(on_target_error="stop")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "paused")
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert rig.errors() == [error_event("write", "stop")]


def test_one_write_error_under_report_fails_the_job(blkdebug_target_rig):
    rig = blkdebug_target_rig()
    before = rig.disk_bytes()
    rig.mirror()
    assert_failed_without_pivot(rig, "write", before)


@pytest.fixture
def bad_sector_rig(rigs, servers, tmp_path):
    """The base is served by nbdkit eval; its first read of one exact offset fails (EIO)."""
    from conftest import make_image
    base = make_image(tmp_path / "nbd-base.img", 4 * MiB, [(0, 4 * MiB)], seed=3)
    rig = rigs(base_server=bad_sector_server(servers, base, tmp_path, 2 * MiB + 4096))
    rig.expected = Path(base).read_bytes()
    return rig


def test_one_read_error_under_report_fails_the_job(bad_sector_rig):
    rig = bad_sector_rig
    rig.mirror()
    assert rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]["error"] == IO_ERROR
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.names() == FAILED_ORDER
    assert rig.errors() == [error_event("read", "report")]
    assert rig.qmp.execute("query-block")[0]["active"] is None
    assert rig.disk_bytes() == rig.expected


def test_one_read_error_under_ignore_is_one_event_and_the_copy_completes(bad_sector_rig):
    rig = bad_sector_rig
    rig.mirror(on_source_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig, rig.expected)
    assert rig.errors() == [error_event("read", "ignore")]
    assert "JOB_STATUS_CHANGE:paused" not in rig.qmp.names()


def test_one_read_error_under_stop_pauses_once_and_resume_completes(bad_sector_rig):
    rig = bad_sector_rig
    rig.mirror(on_source_error="stop")
    rig.qmp.wait_status("disk0", "paused")
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig, rig.expected)
    assert rig.errors() == [error_event("read", "stop")]


def test_base_server_that_drops_the_connection_once_is_reconnected_transparently(
        rigs, servers, tmp_path):
    # qemu-nbd 7.2 over blkdebug answers a failed structured read by disconnecting.
    # The base backend reads again on a new connection; the one-shot fault is gone.
    from conftest import make_image
    base = make_image(tmp_path / "nbd-base.img", 4 * MiB, [(0, 4 * MiB)], seed=3)
    server = blkdebug_server(servers, base, tmp_path, "read_aio", 2 * MiB + 4096, name="base")
    rig = rigs(base_server=server)
    rig.mirror()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    assert "BLOCK_JOB_ERROR" not in rig.qmp.names()
    complete_and_check(rig)


# --- ENOSPC (248) and the enospc/auto policies -----------------------------------------------

@pytest.mark.parametrize("policy", ["enospc", "auto"])
def test_enospc_stops_with_io_status_nospace_and_resume_after_space_appears(rigs, fault,
                                                                           policy):
    rig = target_fault_rig(rigs, fault, error="ENOSPC")
    fault.on()
    rig.mirror(on_target_error=policy)
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "paused")
    info = rig.qmp.job("disk0")
    assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "nospace")
    fault.off()                                            # space appears
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_status("disk0", "running")
    assert rig.qmp.job("disk0")["io-status"] == "ok"
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)


@pytest.mark.parametrize("policy", ["enospc", "auto"])
def test_enospc_policy_reports_other_errors(rigs, fault, policy):
    rig = target_fault_rig(rigs, fault, error="EIO")
    before = rig.disk_bytes()
    fault.on()
    rig.mirror(on_target_error=policy)
    assert_failed_without_pivot(rig, "write", before)


def test_stop_policy_on_enospc_shows_nospace(rigs, fault):
    rig = target_fault_rig(rigs, fault, error="ENOSPC")
    fault.on()
    rig.mirror(on_target_error="stop")
    rig.qmp.wait_status("disk0", "paused")
    assert rig.qmp.job("disk0")["io-status"] == "nospace"


def test_report_on_enospc_carries_the_enospc_text(rigs, fault):
    rig = target_fault_rig(rigs, fault, error="ENOSPC")
    fault.on()
    rig.mirror()
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert done["data"]["error"] == "No space left on device"


# --- changing policies (block-job-change, jobctl set-policy) --------------------------------

def test_policy_change_on_a_stopped_job_governs_the_next_error(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    fault.on()
    rig.mirror(on_target_error="stop")
    rig.qmp.wait_status("disk0", "paused")
    rig.qmp("block-job-change", id="disk0", on_target_error="ignore")
    rig.qmp("block-job-resume", device="disk0")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "ignore")
    time.sleep(0.3)
    assert rig.qmp.job("disk0")["status"] == "running"
    rig.qmp("block-job-change", id="disk0", on_target_error="report")
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR", timeout=10)["data"]) == error_event(
        "write", "report")
    assert rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]["error"] == IO_ERROR
    assert rig.qmp.execute("query-block")[0]["active"] is None


def test_query_block_jobs_shows_why_a_job_paused_and_its_policies(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    fault.on()
    rig.mirror(on_target_error="stop")
    error = rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]
    assert (error["x-errno"], error["x-desc"]) == ("EIO", IO_ERROR)
    rig.qmp.wait_status("disk0", "paused")
    info = rig.qmp.job("disk0")
    assert info["x-last-error"]["operation"] == "write"
    assert (info["x-last-error"]["errno"], info["x-last-error"]["desc"]) == ("EIO", IO_ERROR)
    assert info["x-policies"] == {"on-source-error": "report", "on-target-error": "stop",
                                  "copy-mode": "background"}
    rig.qmp("block-job-change", id="disk0", on_target_error="ignore")
    assert rig.qmp.job("disk0")["x-policies"]["on-target-error"] == "ignore"


def test_jobctl_set_policy_changes_a_running_job(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    fault.on()
    rig.mirror(on_target_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_ERROR")
    jobctl = Path(sys.executable).parent / "jobctl"
    out = subprocess.run([str(jobctl), "--socket", str(rig.ctl_path), "set-policy", "disk0",
                          "--on-target-error", "stop"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert rig.qmp.wait_event("BLOCK_JOB_ERROR", timeout=10, action="stop")
    rig.qmp.wait_status("disk0", "paused")
    fault.off()
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)


# --- a target that goes away and comes back ---------------------------------------------------

def kill_target_mid_copy(rig):
    wait_until(lambda: 0 < rig.qmp.job("disk0")["offset"])
    rig.target.kill9()


@pytest.mark.slow
def test_target_restart_under_ignore_reconnects_and_loses_nothing(rigs, servers, tmp_path):
    rig = rigs(size=8 * MiB)
    expected = rig.disk_bytes()
    rig.mirror(on_target_error="ignore", speed=4 * MiB)
    kill_target_mid_copy(rig)
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "ignore")
    time.sleep(0.5)                                        # a few failed reconnects
    rig.target = restart(servers, rig.target, tmp_path)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=20)
    complete_and_check(rig, expected)
    assert "JOB_STATUS_CHANGE:paused" not in rig.qmp.names()


@pytest.mark.slow
def test_target_restart_under_stop_pauses_then_resume_reconnects(rigs, servers, tmp_path):
    rig = rigs(size=8 * MiB)
    expected = rig.disk_bytes()
    rig.mirror(on_target_error="stop", speed=4 * MiB)
    kill_target_mid_copy(rig)
    assert qemu_fields(rig.qmp.wait_event("BLOCK_JOB_ERROR")["data"]) == error_event("write", "stop")
    rig.qmp.wait_status("disk0", "paused")
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.target = restart(servers, rig.target, tmp_path)
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=20)
    complete_and_check(rig, expected)
    assert rig.errors() == [error_event("write", "stop")]


@pytest.mark.slow
def test_copies_acknowledged_but_not_flushed_by_a_dead_target_are_copied_again(
        rigs, servers, tmp_path):
    # nbdkit's cache filter (writeback) holds writes until a flush: kill -9 loses them.
    rig = rigs(size=8 * MiB, target_filters=["cache"], target_args=["cache=writeback"])
    expected = rig.disk_bytes()
    rig.mirror(on_target_error="ignore", speed=4 * MiB)
    wait_until(lambda: rig.qmp.job("disk0")["offset"] >= 2 * MiB)
    rig.target.kill9()
    rig.qmp.wait_event("BLOCK_JOB_ERROR")
    rig.target = restart(servers, rig.target, tmp_path)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=20)
    complete_and_check(rig, expected)


def test_target_lost_while_ready_is_found_and_reconnected_before_completion(rigs, servers,
                                                                          tmp_path):
    rig = rigs()
    rig.mirror(on_target_error="ignore")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.target.kill9()
    rig.target = restart(servers, rig.target, tmp_path)
    rig.h.pwrite(b"after the restart", 5 * 4096)
    complete_and_check(rig)


def test_resume_while_the_target_is_still_down_stops_again(rigs, servers, tmp_path):
    rig = rigs()
    rig.mirror(on_target_error="stop", speed=2 * MiB)
    kill_target_mid_copy(rig)
    rig.qmp.wait_status("disk0", "paused")
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_status("disk0", "running")
    rig.qmp.wait_status("disk0", "paused")
    assert rig.errors() == [error_event("write", "stop")] * 2
    rig.target = restart(servers, rig.target, tmp_path)
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=20)
    complete_and_check(rig)


# --- cancel of a job paused on an error (229) ---------------------------------------------------

def test_force_cancel_of_a_job_paused_on_error_is_cancelled(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    before = rig.disk_bytes()
    fault.on()
    rig.mirror(on_source_error="stop", on_target_error="stop")
    rig.qmp.wait_status("disk0", "paused")
    from jobctl.qmp_client import QMPError
    with pytest.raises(QMPError) as e:
        rig.qmp("block-job-cancel", device="disk0")
    assert e.value.desc == "The block job for device 'disk0' is currently paused"
    assert rig.qmp.job("disk0")["status"] == "paused"
    rig.qmp("block-job-cancel", device="disk0", force=True)
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED")
    rig.qmp.wait_status("disk0", "null")
    names = rig.qmp.names()
    assert "BLOCK_JOB_COMPLETED" not in names and "BLOCK_JOB_READY" not in names
    assert rig.qmp.execute("query-block")[0]["active"] is None
    assert rig.disk_bytes() == before


def test_force_cancel_of_a_ready_job_in_standby_on_error_is_cancelled(rigs, fault):
    rig = target_fault_rig(rigs, fault)
    rig.mirror(on_target_error="stop")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    fault.on()
    rig.h.pwrite(b"x" * 4096, 0)
    rig.qmp.wait_status("disk0", "standby")
    rig.qmp("job-cancel", id="disk0")
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED")
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.execute("query-block")[0]["active"] is None


# --- persistent faults must not spin -------------------------------------------------------------
#
# These jobs run in the test's process (helpers.LocalDisk: the plugin's Service, a real
# base and target) on a clock the test steps 10 ms at a time, so the back-off and the
# spacing of the events are checked to the step, whatever the machine's load.
# docs/errors.md: a failed range waits 50 ms, each further failure doubles it up to
# 5 s; ignored BLOCK_JOB_ERRORs of one operation at most once a second.

BACKOFF_FIRST, BACKOFF_MAX, EVENT_INTERVAL = 0.05, 5.0, 1.0


class Attempts:
    """When a persistent fault was hit: (clock time, requests) of each step that hit it."""

    def __init__(self, disk, count):
        self.disk, self.count = disk, count
        self.batches = []
        self.total = 0
        self.note()

    def note(self):
        n = self.count()
        if n > self.total:
            self.batches.append((self.disk.now(), n - self.total))
            self.total = n

    def times(self):
        return [t for t, _ in self.batches]


def assert_backs_off(times, step):
    """Each retry waits twice as long as the one before, from 50 ms up to 5 s (to the step)."""
    for i, (a, b) in enumerate(zip(times, times[1:])):
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** i)
        assert delay - 1e-6 <= b - a <= delay + 2 * step, (i, times)


def coalesced(times):
    """The times of the events the engine sends for errors at `times`: the first, then
    the first error at least EVENT_INTERVAL after the last one sent."""
    sent = []
    for t in times:
        if not sent or t - sent[-1] >= EVENT_INTERVAL:
            sent.append(t)
    return sent


def test_persistent_target_fault_under_ignore_backs_off_and_coalesces_events(
        local_disks, servers, tmp_path, fault):
    size = 4 * MiB
    base = make_image(tmp_path / "base.img", size,
                      [(0, size // 2 - 65536), (size // 2 + 65536, size // 2 - 65536)], seed=11)
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(size)
    target = servers.nbdkit("file", str(target_path), *error_args(fault), filters=["error"])
    disk = local_disks(base)
    fault.on()
    job = disk.mirror(target.uri, on_target_error="ignore")
    attempts = Attempts(disk, lambda: injected(target, "pwrite") + injected(target, "zero"))
    # The first batch failed and was reported before the clock moved at all.
    assert attempts.batches and attempts.batches[0][0] == 0
    disk.run(4.0, on_step=attempts.note)
    times = attempts.times()
    assert_backs_off(times, disk.STEP)
    assert len(times) == 7, times                  # 0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15
    # A retry sends again only what failed; without back-off this would be thousands.
    assert all(n <= attempts.batches[0][1] for _, n in attempts.batches), attempts.batches
    assert attempts.total <= 60, attempts.total
    errors = disk.named("BLOCK_JOB_ERROR")
    assert [t for t, _ in errors] == coalesced(times) and len(errors) == 3, (errors, times)
    assert all(qemu_fields(data) == error_event("write", "ignore") for _, data in errors)
    info = block_job_info(job)
    assert (info["status"], info["io-status"], info["paused"], info["ready"]) == (
        "running", "ok", False, False)
    # The back-off is bounded: the job catches up within 5 s of the fault clearing,
    # and not before the next retry is due.
    fault.off()
    cleared = disk.now()
    retry = times[-1] + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(times) - 1))
    disk.run(BACKOFF_MAX + 1, until=lambda: job.is_ready)
    (ready, _), = disk.named("BLOCK_JOB_READY")
    assert retry - 1e-6 <= ready <= cleared + BACKOFF_MAX + 2 * disk.STEP, (cleared, retry, ready)
    assert len(disk.named("BLOCK_JOB_ERROR")) == 3
    expected = disk.read()
    disk.complete()
    (_, done), = disk.named("BLOCK_JOB_COMPLETED")
    assert "error" not in done
    assert disk.service.active_target() == target.uri
    assert target_path.read_bytes() == expected


def test_one_bad_source_range_backs_off_while_the_rest_is_copied(
        local_disks, servers, tmp_path):
    size, bad = 8 * MiB, 5 * MiB + 4096
    base = make_image(tmp_path / "nbd-base.img", size, [(0, size)], seed=5)
    server = bad_sector_server(servers, base, tmp_path, bad, once=False)
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(size)
    disk = local_disks(server.uri)
    job = disk.mirror(target_path, on_source_error="ignore")
    attempts = Attempts(disk, lambda: server.log().count("injected bad sector"))
    assert attempts.batches and attempts.batches[0][0] == 0
    # A client keeps writing elsewhere: its copies succeed, the bad range still backs off.
    for i in range(40):
        disk.write(b"%04d" % i * 1024, (i % 4) * MiB)
        disk.run(0.1, on_step=attempts.note)
        info = block_job_info(job)
        assert 0 < info["len"] - info["offset"] <= MiB, (i, info)   # all but the bad chunk
    assert not info["ready"] and info["status"] == "running"
    times = attempts.times()
    assert_backs_off(times, disk.STEP)                     # 50 ms doubling, not every loop
    assert len(times) == 7 and attempts.total <= 12, attempts.batches   # 0 to 3.15 s
    errors = disk.named("BLOCK_JOB_ERROR")
    assert [t for t, _ in errors] == coalesced(times) and len(errors) == 3, (errors, times)
    assert all(qemu_fields(data) == error_event("read", "ignore") for _, data in errors)
    server.bad_sector.unlink()                             # the sector is repaired
    retry = times[-1] + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(times) - 1))
    repaired = disk.now()
    disk.run(BACKOFF_MAX + 1, until=lambda: job.is_ready)
    (ready, _), = disk.named("BLOCK_JOB_READY")
    assert retry - 1e-6 <= ready <= repaired + BACKOFF_MAX + 2 * disk.STEP, (retry, ready)
    expected = disk.read()
    job.user_cancel()                                      # point-in-time copy, no pivot
    disk.wait_event("JOB_STATUS_CHANGE", id="disk0", status="null")
    (_, done), = disk.named("BLOCK_JOB_COMPLETED")
    assert "error" not in done
    assert disk.service.active_target() is None
    assert target_path.read_bytes() == expected


# --- slow and stalled targets -------------------------------------------------------------------

def test_flaky_slow_target_under_ignore_ends_equal(rigs, tmp_path):
    rig = rigs(size=8 * MiB, target_filters=["error", "delay"],
               target_args=error_args(rate="50%") + ["delay-write=20ms", "delay-zero=20ms"])
    rig.mirror(on_target_error="ignore", buf_size=4 * MiB)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=30)
    rig.qmp("block-job-cancel", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert rig.target_bytes() == rig.disk_bytes()
    injected_errors = injected(rig.target, "pwrite") + injected(rig.target, "zero")
    # Random faults: almost always some; every one was reported or coalesced.
    assert bool(rig.errors()) == (injected_errors > 0)
    assert all(e == error_event("write", "ignore") for e in rig.errors())


def test_force_cancel_while_the_target_hangs_in_a_flush_is_prompt(flush_fault_rig, stall):
    rig = flush_fault_rig
    stall.on()
    rig.mirror(on_target_error="stop")
    wait_until(lambda: (lambda i: i["offset"] == i["len"] > 0)(rig.qmp.job("disk0")))
    time.sleep(0.3)                                        # copied: the flush hangs
    assert rig.qmp.job("disk0")["status"] == "running"
    start = time.monotonic()
    rig.qmp("job-cancel", id="disk0")
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=10)
    assert time.monotonic() - start < 3
    stall.off()


def stall_target_mid_copy(rig, control, quiet=0.5):
    """Mirror until the target stops answering: the job's progress stops (for `quiet`
    seconds in a row, whatever the machine's load), the job still running."""
    rig.mirror(on_target_error="stop", speed=2 * MiB)
    wait_until(lambda: 0 < rig.qmp.job("disk0")["offset"])
    control.pause()                     # answers once the requests already sent are done
    # The job reaps those, then its next copies are sent and get stuck.
    last, since = None, time.monotonic()
    deadline = since + 20
    while True:
        info = rig.qmp.job("disk0")
        if info["offset"] != last:
            last, since = info["offset"], time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        assert time.monotonic() < deadline, "the job never stopped progressing: %s" % info
        time.sleep(0.05)
    assert (info["status"], info["io-status"]) == ("running", "ok")
    assert 0 < info["offset"] < info["len"]


def test_force_cancel_with_a_stalled_target_is_prompt(rigs, tmp_path):
    control = PauseControl(tmp_path / "pause.sock")
    rig = rigs(target_filters=["pause"], target_args=["pause-control=%s" % control.path])
    stall_target_mid_copy(rig, control)
    start = time.monotonic()
    rig.qmp("block-job-cancel", device="disk0", force=True)
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=10)
    assert time.monotonic() - start < 3
    control.resume()
    assert rig.qmp.execute("query-block")[0]["active"] is None


def test_stalled_target_that_resumes_lets_the_job_finish(rigs, tmp_path):
    control = PauseControl(tmp_path / "pause.sock")
    rig = rigs(target_filters=["pause"], target_args=["pause-control=%s" % control.path])
    stall_target_mid_copy(rig, control)
    control.resume()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=10)
    complete_and_check(rig)
    assert rig.errors() == []
