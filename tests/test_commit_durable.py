"""block-commit outlives the process: kill -9 during the bulk copy, while ready and during
complete, with a client writing; a crash during complete leaves the overlay whole (the
job comes back) or empty (the commit is done), never a mix.

The model of the disk (commit_rig.Model, as test_durable's): bytes a kill -9 may lose
(written after the client's last flush) are uncertain until read back; every other byte
must be exact.
"""

import json
import os
import random
import time

import pytest

from commit_rig import CommitRig, MiB, Model, Writer

SIZE = 32 * MiB
SPEED = 16 * MiB


def _rig(servers, tmp_path, base_kind):
    rig = CommitRig(servers, tmp_path, base_kind, size=SIZE)
    rig.h.pwrite(random.Random(4).randbytes(16 * MiB), 8 * MiB)     # half the disk to commit
    rig.h.zero(2 * MiB, MiB)
    rig.h.flush()
    rig.model = Model(rig.disk_bytes())
    return rig


def _recovered(rig):
    return rig.qmp.wait_event("JOB_RECOVERED")["data"]


def _empty(alloc):
    return alloc["absent-clusters"] == alloc["clusters"]


@pytest.mark.slow
@pytest.mark.parametrize("base_kind", ["file", "nbdkit"])
def test_kill9_during_bulk_ready_and_complete_with_a_writing_client(servers, tmp_path,
                                                                     base_kind):
    seed = int(os.environ.get("DURABLE_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print("\nseed=%d (DURABLE_SEED=... to repeat)" % seed)
    rig = _rig(servers, tmp_path, base_kind)
    w = Writer(rig.disk.uri, SIZE, seed, rig.model, pace=0.01)
    w.start()
    rig.commit(speed=SPEED)
    for phase in ["bulk"] * 3 + ["ready"] * 4:
        if phase == "bulk":
            time.sleep(rnd.uniform(0.05, 0.5))
        else:
            rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
            time.sleep(rnd.uniform(0.0, 1.0))
        info = rig.qmp.job("disk0")
        rig.kill9()
        w.finish(flush=False)
        rig.restart()
        rec = _recovered(rig)
        assert rec["type"] == "commit" and rec["after"] == "crash"
        assert set(rig.meta()["base_check"]) == {"size"}
        rig.model.check_and_adopt(rig.disk_bytes())
        print("%-5s killed at offset %9d/%9d ready=%-5s | restart: dirty %9d"
              % (phase, info["offset"], info["len"], info["ready"], rec["dirty"]))
        w = Writer(rig.disk.uri, SIZE, rnd.randrange(1 << 30), rig.model, pace=0.01)
        w.start()
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    w.finish(flush=True)
    expected = rig.disk_bytes()
    rig.model.check_and_adopt(expected)
    held = rig.allocation()
    for attempt in range(5):
        rig.qmp("block-job-complete", device="disk0")
        time.sleep(rnd.choice([0.0, 0.001, 0.003, 0.01, 0.03]))
        rig.kill9()
        rig.restart()
        assert rig.disk_bytes() == expected
        alloc = rig.allocation()
        jobs = rig.qmp.execute("query-block-jobs")
        if not jobs:
            assert _empty(alloc), alloc                  # done: the overlay is empty
            print("complete killed (attempt %d): done" % attempt)
            break
        assert alloc == held, (alloc, held)              # the overlay is whole
        print("complete killed (attempt %d): job back" % attempt)
        rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    else:
        rig.qmp("block-job-complete", device="disk0")
        rig.qmp.wait_status("disk0", "null", timeout=120)
    assert _empty(rig.allocation()) and rig.records() == {}
    assert rig.base_bytes() == expected
    rig.stop()
    rig.restart()
    assert rig.disk_bytes() == expected and rig.qmp.execute("query-block-jobs") == []


def _ready_then_killed(servers, tmp_path):
    """A commit that is READY (base == disk, flushed), then kill -9: record and overlay
    as a crash in complete would leave them just before the overlay is emptied."""
    rig = _rig(servers, tmp_path, "file")
    rig.commit()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    expected = rig.disk_bytes()
    held = rig.allocation()
    rig.kill9()
    path = rig.overlay_dir / "jobs" / "disk0.json"
    record = json.loads(path.read_text())
    record["completing"] = True
    path.write_text(json.dumps(record))
    return rig, expected, held


def test_a_crash_after_the_overlay_was_emptied_drops_the_record(servers, tmp_path):
    rig, expected, _ = _ready_then_killed(servers, tmp_path)
    # What the commit point leaves: the empty map, no journal record to replay.
    (rig.overlay_dir / "clusters.map").write_bytes(bytes(SIZE // (64 * 1024)))
    for name in ("clusters.journal.0", "clusters.journal.1"):
        with open(rig.overlay_dir / name, "r+b") as f:
            f.write(bytes(32))
    rig.restart()
    assert rig.qmp.execute("query-block-jobs") == []
    assert rig.records() == {} and not os.listdir(rig.overlay_dir / "jobs")
    assert "the commit had emptied the overlay before the stop" in rig.disk.log()
    assert _empty(rig.allocation())
    assert rig.disk_bytes() == expected == rig.base_bytes()


def test_a_crash_before_the_overlay_was_emptied_brings_the_job_back(servers, tmp_path):
    rig, expected, held = _ready_then_killed(servers, tmp_path)
    rig.restart()
    assert _recovered(rig)["type"] == "commit"
    assert rig.allocation() == held and rig.disk_bytes() == expected
    rig.qmp.wait_event("BLOCK_JOB_READY")
    assert rig.records()["disk0"]["completing"] is False
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert _empty(rig.allocation()) and rig.base_bytes() == expected


def test_sigterm_saves_the_commit_and_it_goes_on(servers, tmp_path):
    rig = _rig(servers, tmp_path, "nbdkit")
    rig.commit(speed=4 * MiB, on_error="stop")
    rig.qmp.wait_status("disk0", "running")
    time.sleep(0.3)
    rig.stop()
    rec = rig.records()["disk0"]
    assert rec["shutdown"] is True and rec["type"] == "commit" and rec["on-error"] == "stop"
    rig.restart()
    got = _recovered(rig)
    assert got["after"] == "shutdown" and got["dirty"] > 0
    job = rig.qmp.job("disk0")
    assert job["speed"] == 4 * MiB and job["x-policies"] == {"on-error": "stop"}
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.base_bytes() == expected
