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
    job, turns = _mirror_counting_turns(disk, target, monkeypatch, speed=1 << 40)
    assert len(turns) >= copies, (len(turns), copies)
    _end(disk, job, target)
