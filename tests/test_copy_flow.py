"""A turn of a copying job's loop keeps its copies flowing while the target answers
(CopyJob._keep_flowing): the rest of a turn (pause point, progress, checkpoints) comes
at most every TURN_BUDGET, not once per answer."""

import random

from plugin.jobs import copyjob
from plugin.jobs.mirror import MAX_CHUNK, MirrorJob

MiB = 1 << 20
CLUSTER = 65536


def _scattered_disk(local_disks, tmp_path, size, seed):
    """A disk whose overlay holds every other cluster (4 KiB written in each), and a
    target file of its size: a mirror's copies are many separate clusters."""
    from conftest import make_image
    base = make_image(tmp_path / "base.img", size, seed=seed)
    disk = local_disks(base)
    rnd = random.Random(seed)
    for c in range(0, size // CLUSTER, 2):
        disk.disk.write(bytearray(rnd.randbytes(4096)), c * CLUSTER + 8192)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(size)
    return disk, target


def _mirror_counting_turns(disk, target, monkeypatch, **options):
    turns = []
    real = MirrorJob._each_turn

    def each_turn(job):
        turns.append(job.copy.copied)
        return real(job)
    monkeypatch.setattr(MirrorJob, "_each_turn", each_turn)
    # One copy in flight at a time (buf-size = one chunk): without the flow, every
    # copy is a turn of its own.
    job = disk.mirror(str(target), granularity=CLUSTER, buf_size=MAX_CHUNK, sync="top",
                      **options)
    disk.wait_event("BLOCK_JOB_READY")
    return job, turns


def _end(disk, job, target):
    expected = disk.read()
    job.user_cancel()
    disk.wait_event("JOB_STATUS_CHANGE", id="disk0", status="null")
    assert target.read_bytes() == expected


def test_copies_flow_within_a_turn_while_the_target_answers(local_disks, tmp_path,
                                                            monkeypatch):
    size = 32 * MiB
    disk, target = _scattered_disk(local_disks, tmp_path, size, seed=11)
    copies = size // CLUSTER // 2
    job, turns = _mirror_counting_turns(disk, target, monkeypatch)
    # 256 separate copies, one in flight at a time: a turn per copy would be 256
    # turns; flowing, a turn ends only after TURN_BUDGET (20 ms) of copying.
    assert len(turns) < copies // 4, (len(turns), copies)
    _end(disk, job, target)


def test_a_turn_ends_after_its_budget_even_while_the_target_answers(local_disks, tmp_path,
                                                                    monkeypatch):
    """With no budget, every copy is a turn again: the budget is what bounds a turn
    (so a pause, a cancel or a checkpoint never waits for the whole copy)."""
    monkeypatch.setattr(copyjob, "TURN_BUDGET", 0.0)
    size = 8 * MiB
    disk, target = _scattered_disk(local_disks, tmp_path, size, seed=12)
    copies = size // CLUSTER // 2
    job, turns = _mirror_counting_turns(disk, target, monkeypatch)
    assert len(turns) >= copies, (len(turns), copies)
    _end(disk, job, target)


def test_a_rate_limited_job_copies_one_range_per_turn(local_disks, tmp_path, monkeypatch):
    """A speed limit pays for each copy before the next (issue()): no flow around it."""
    size = 4 * MiB
    disk, target = _scattered_disk(local_disks, tmp_path, size, seed=13)
    copies = size // CLUSTER // 2
    turns = []
    real = MirrorJob._each_turn

    def each_turn(job):
        turns.append(job.copy.copied)
        return real(job)
    monkeypatch.setattr(MirrorJob, "_each_turn", each_turn)
    job = disk.mirror(str(target), granularity=CLUSTER, sync="top", speed=1 << 40)
    disk.wait_event("BLOCK_JOB_READY")
    assert len(turns) >= copies, (len(turns), copies)
    _end(disk, job, target)


def _ready_mirror_with_a_request_in_progress(local_disks, tmp_path, monkeypatch):
    """A mirror in READY (on the test's clock) and a client request that stays in
    progress (the test holds the disk's gate as a request does): returns the disk,
    the job, the target, the calls to Disk.busy the job made, and a write it has to copy."""
    from conftest import make_image
    size = 4 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=21)
    disk = local_disks(base)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(size)
    job = disk.mirror(str(target), granularity=CLUSTER)
    disk.wait_event("BLOCK_JOB_READY")
    asked = []
    real_busy = disk.disk.busy
    disk.disk.busy = lambda: asked.append(1) or real_busy()
    disk.disk._gate.enter()                    # a client request in progress
    disk.disk.write(bytearray(random.Random(22).randbytes(4096)), MiB + 8192)
    return disk, job, target, asked


def _wait(until, timeout=30):
    import time
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_copy_in_ready_waits_for_the_client_requests_in_progress(local_disks, tmp_path,
                                                                   monkeypatch):
    """Before each copy a mirror in READY lets the client requests in progress finish
    (a copy holds the GIL for tens of microseconds, which a request in progress would
    wait for): with one that does not end, the write stays uncopied while the job keeps
    asking; once it ends, the copy goes."""
    from plugin.blockcopy import pipeline
    monkeypatch.setattr(pipeline, "GIVE_WAY_MAX", 60.0)
    disk, job, target, asked = _ready_mirror_with_a_request_in_progress(
        local_disks, tmp_path, monkeypatch)
    copied = job.copy.copied
    disk.clock.advance(1.0)                    # the job's batch interval has passed
    _wait(lambda: len(asked) >= 5)             # it is waiting for the request to end
    assert job.copy.copied == copied and not job.bitmap.is_clean()
    disk.disk._gate.leave()
    _wait(lambda: job.copy.copied > copied)
    disk.settle()
    _end(disk, job, target)


def test_a_mirror_behind_its_clients_copies_without_giving_way(local_disks, tmp_path,
                                                               monkeypatch):
    """Past GIVE_WAY_BEHIND dirty bytes a ready mirror copies at full speed, requests in
    progress or not (it would otherwise never catch up with busy clients)."""
    from plugin.blockcopy import pipeline
    from plugin.jobs import syncjob
    monkeypatch.setattr(pipeline, "GIVE_WAY_MAX", 60.0)
    monkeypatch.setattr(syncjob, "GIVE_WAY_BEHIND", 0)
    disk, job, target, asked = _ready_mirror_with_a_request_in_progress(
        local_disks, tmp_path, monkeypatch)
    copied = job.copy.copied
    disk.clock.advance(1.0)
    _wait(lambda: job.copy.copied > copied)    # with the request still in progress
    disk.disk._gate.leave()
    disk.settle()
    _end(disk, job, target)
