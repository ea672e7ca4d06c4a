"""A real QEMU guest writes to the disk while a mirror fights a failing target.

The guest (tests/guest.py) keeps writing 4 KiB blocks through virtio-blk to the overlay
server; the mirror copies to a target whose writes fail while a fault switch is on
(nbdkit's error filter).  Under ignore the job retries until the fault clears; under stop
it pauses while the guest goes on writing.  Either way the job then completes (pivot,
with the guest still writing), and the target must hold exactly the base with every
block the guest reported written on top.
"""

import pytest

import guest
from faults import MiB, FaultSwitch, MirrorRig, error_args

SIZE = 64 * MiB


@pytest.fixture
def fault(tmp_path):
    return FaultSwitch(tmp_path / "fault")


@pytest.fixture
def rig(servers, tmp_path, connect, fault):
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE, target_filters=["error"],
                    target_args=error_args(fault))
    yield rig
    rig.close()


def start_writer(rig, tmp_path, guest_image, seconds):
    return guest.start_guest(rig.disk.sock, {"mode": "writeloop", "seed": 41, "seconds": seconds},
                             image=guest_image, log_path=tmp_path / "guest.log",
                             timeout=seconds + 90)


def more_writes(g, count):
    """Wait until the guest has logged `count` more writes than now."""
    return g.wait_for_writes(len(g.report().writes) + count, timeout=60)


def expected_target(rig, result):
    """The base with every block the guest wrote on top."""
    data = bytearray(open(rig.base, "rb").read())
    for w in result.writes:
        data[w.offset:w.offset + w.length] = guest.expected_block(result.seed, w.seq, w.length)
    return bytes(data)


def complete_while_the_guest_writes(rig, g):
    more_writes(g, 10)
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"]
    assert rig.qmp.execute("query-block")[0]["active"] == rig.target.uri
    more_writes(g, 10)                          # after the pivot, straight to the target


@pytest.mark.guest
@pytest.mark.slow
def test_guest_writes_survive_a_failing_target_under_ignore(rig, fault, tmp_path, guest_image):
    with start_writer(rig, tmp_path, guest_image, seconds=14) as g:
        g.wait_for_writes(5, timeout=90)
        fault.on()
        rig.mirror(on_target_error="ignore")
        first = rig.qmp.wait_event("BLOCK_JOB_ERROR")
        assert first["data"] == {"device": "disk0", "operation": "write", "action": "ignore",
                                 "x-errno": "EIO", "x-desc": "Input/output error"}
        more_writes(g, 30)                      # the guest is not held up by the failures
        info = rig.qmp.job("disk0")
        assert (info["status"], info["ready"], info["io-status"]) == ("running", False, "ok")
        fault.off()
        rig.qmp.wait_event("BLOCK_JOB_READY", timeout=30)
        complete_while_the_guest_writes(rig, g)
        result = g.wait()
    result.raise_if_failed()
    assert guest.check_writes(result, rig.target_path) == []
    assert rig.target_bytes() == expected_target(rig, result)
    assert "JOB_STATUS_CHANGE:paused" not in rig.qmp.names()


@pytest.mark.guest
@pytest.mark.slow
def test_guest_keeps_writing_while_the_job_is_stopped_on_error(rig, fault, tmp_path,
                                                              guest_image):
    with start_writer(rig, tmp_path, guest_image, seconds=14) as g:
        g.wait_for_writes(5, timeout=90)
        fault.on()
        rig.mirror(on_target_error="stop")
        first = rig.qmp.wait_event("BLOCK_JOB_ERROR")
        assert first["data"] == {"device": "disk0", "operation": "write", "action": "stop",
                                 "x-errno": "EIO", "x-desc": "Input/output error"}
        rig.qmp.wait_status("disk0", "paused")
        more_writes(g, 30)                      # the disk keeps serving the guest
        info = rig.qmp.job("disk0")
        assert (info["status"], info["paused"], info["io-status"]) == ("paused", True, "failed")
        fault.off()
        rig.qmp("block-job-resume", device="disk0")
        assert rig.qmp.job("disk0")["io-status"] == "ok"
        rig.qmp.wait_event("BLOCK_JOB_READY", timeout=30)
        complete_while_the_guest_writes(rig, g)
        result = g.wait()
    result.raise_if_failed()
    assert guest.check_writes(result, rig.target_path) == []
    assert rig.target_bytes() == expected_target(rig, result)
    errors = [e for e in rig.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]
    assert len(errors) == 1


@pytest.mark.guest
@pytest.mark.slow
def test_guest_with_reconnect_delay_rides_out_nbdkit_killed_and_restarted_mid_mirror(
        servers, tmp_path, connect, guest_image):
    """Jobs outlive the process: nbdkit is killed (-9) and restarted while a mirror copies and
    a guest writes; the guest's drive has reconnect-delay, so it waits and goes on; the
    mirror comes back from its record, completes, and the target holds what the guest wrote."""
    from helpers import Control
    rig = MirrorRig(servers, tmp_path, connect, size=SIZE)
    try:
        with guest.start_guest(rig.disk.sock, {"mode": "writeloop", "seed": 43, "seconds": 25},
                               image=guest_image, log_path=tmp_path / "guest.log", timeout=150,
                               blockdev_options={"reconnect-delay": 30}) as g:
            g.wait_for_writes(5, timeout=90)
            rig.mirror(speed=8 * MiB)                # slow: the kill lands mid-copy
            rig.qmp.wait_status("disk0", "running")
            while rig.qmp.job("disk0")["offset"] < 4 * MiB:   # a guest write is the clock
                more_writes(g, 1)
            rig.qmp.close()
            rig.disk.kill9()
            rig.disk = servers.restart(rig.disk)
            rig.qmp = Control(rig.ctl_path)
            assert rig.qmp.wait_event("JOB_RECOVERED", timeout=30)["data"]["id"] == "disk0"
            rig.qmp("block-job-set-speed", device="disk0", speed=0)
            rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
            more_writes(g, 10)                       # the guest reconnected and goes on
            complete_while_the_guest_writes(rig, g)
            result = g.wait().raise_if_failed()
        assert rig.target_bytes() == expected_target(rig, result)
    finally:
        rig.close()
