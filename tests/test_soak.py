"""The chaos soak (scripts/soak, docs/soak.md): a short run for a few fixed seeds, and
the harness's own pure parts (the schedule, the model's checks)."""

import itertools
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from soaklib.model import Change, DiskModel, Mask, first_missing   # noqa: E402
from soaklib.runner import schedule                                # noqa: E402

# Seeds whose first steps meet many operations early: jobs of each kind, kill -9,
# SIGTERM, stopped and failing targets, complete and cancel (picked from the schedule).
SEEDS = [433, 462, 208]
SECONDS = 15


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_short_soak_holds_every_invariant(tmp_path, seed):
    env = dict(os.environ, PYTHONPATH=str(REPO / "scripts"))
    done = subprocess.run([sys.executable, "-m", "soaklib", "--seed", str(seed),
                           "--seconds", str(SECONDS), "--workdir", str(tmp_path / "soak")],
                          env=env, capture_output=True, text=True, timeout=240)
    print(done.stdout[-4000:])
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-4000:]
    assert "passed" in done.stdout


def test_the_schedule_is_a_pure_function_of_the_seed():
    def first(seed):
        return [(i, o.name, s) for i, o, s in itertools.islice(schedule(seed), 200)]
    assert first(7) == first(7)
    assert first(7) != first(8)
    assert len({name for _, name, _ in first(7)}) > 15


def test_model_finds_a_lost_flushed_block_and_an_unflushed_one():
    model = DiskModel(bytes(64 * 1024))
    for offset, data in ((0, b"a" * 4096), (8192, b"b" * 4096)):
        c = Change("write", offset, 4096, data)
        model.begin(c)
        model.acked(c)
        if offset == 0:
            flush = Change("flush")
            model.begin(flush)
            model.acked(flush)
    problems = model.verify(bytes(64 * 1024))
    assert any("at 0 " in p and "(flushed bytes lost)" in p for p in problems)
    assert any("at 8192 " in p and "unflushed" in p for p in problems)


def test_model_takes_either_bytes_of_a_failed_change_sector_by_sector_but_not_others():
    model = DiskModel(bytes(8192))
    c = Change("write", 0, 4096, b"n" * 4096)
    model.begin(c)
    model.failed(c)
    mixed = b"n" * 512 + bytes(3584) + bytes(4096)
    assert model.verify(mixed) == []
    assert model.snapshot() == mixed
    c = Change("write", 0, 4096, b"m" * 4096)
    model.begin(c)
    model.failed(c)
    assert model.verify(b"x" * 512 + mixed[512:]) != []


def test_a_bitmap_missing_a_changed_granule_is_found():
    size = 4 << 20
    changes = Mask.of(size, [(65536 + 4096, 4096), (2 << 20, 8192)])
    assert first_missing(changes, [(65536, 65536), (2 << 20, 65536)], 65536) is None
    assert first_missing(changes, [(65536, 65536)], 65536) == (2 << 20, 65536)


def test_job_change_has_options_for_every_kind_of_job_the_soak_starts():
    """A 60-minute soak met block-job-change on a commit for the first time and the
    harness died (KeyError 'commit'); every option it sends is one the job accepts."""
    import random
    from soaklib import ops
    from soaklib.core import JobTrack
    from plugin.jobs.backup import BackupJob
    from plugin.jobs.commit import CommitJob
    from plugin.jobs.mirror import MirrorJob
    from plugin.jobs.stream import StreamJob
    classes = {"mirror": MirrorJob, "stream": StreamJob, "backup": BackupJob,
               "commit": CommitJob}

    class Soak:
        sent = []

        def try_qmp(self, command, args):
            self.sent.append(args)
            return True, {}

    soak = Soak()
    for kind, cls in classes.items():
        soak.job = JobTrack("j-" + kind, kind)
        for seed in range(20):
            ops.job_change(soak, random.Random(seed))
        names = {name.replace("-", "_") for args in soak.sent for name in args if name != "id"}
        assert names and names <= cls.changeable_options, (kind, names)
        soak.sent.clear()


def test_no_chain_follows_a_bitmap_disabled_while_its_backup_ran():
    """Seed 994825607: a bitmap disabled while the full backup that started its chain
    still ran; the chain was set up at the backup's end anyway, and the incremental that
    followed (copying nothing: the bitmap had recorded nothing) was taken for a server
    bug.  A chain follows a bitmap only if it covered every change meanwhile."""
    from soaklib import ops
    from soaklib.bitmaps import _end_chain
    from soaklib.core import JobTrack
    from soaklib.model import BitmapModel

    class Target:
        def read(self):
            return b"x" * 512

    class Model:
        size = 1 << 20
        bitmaps = {}

    class Soak:
        model = Model()
        chain = None

    for disabled_meanwhile in (False, True):
        soak = Soak()
        bm = BitmapModel("chain1", soak.model.size, 65536, True, True)
        soak.model.bitmaps = {"chain1": bm}
        track = JobTrack("b1", "backup", Target(), sync="full")
        track.info.update({"snapshot": b"x" * 512, "starts-chain": "chain1", "breaks": 0})
        track.outcome = "completed"
        if disabled_meanwhile:
            bm.recording = False
            _end_chain(soak, bm)
        ops._backup_ended(soak, track)
        assert (soak.chain is None) == disabled_meanwhile


def test_a_mirror_back_after_a_restart_has_forgotten_complete():
    """Seed 1158835865, step 1462: complete, kill -9 before the pivot; the mirror came
    back READY (docs/jobs.md: `complete` again) and a soft cancel then ended it without
    a pivot, as it should, which the harness took for 'completed after complete
    without pivoting'.  After a restart a mirror that is back has no complete asked."""
    from soaklib.core import JobTrack, Soak

    class Model:
        bitmaps = {}

    class Rig:
        def __init__(self, ids):
            self.ids = ids

        def jobs(self):
            return self.ids

    class Fake:
        restarted = Soak.restarted
        forget_unknown_job = Soak.forget_unknown_job

        def __init__(self, job, listed):
            self.model, self.chain, self.job = Model(), None, job
            self.rig = Rig([job.id] if listed else [])
            self.ended = []

        def settle(self):
            pass

        def _end(self, job, outcome):
            self.ended.append((job.id, outcome))
            self.job = None

    for kind in ("mirror", "commit"):
        track = JobTrack("j1", kind)
        track.complete_asked = True
        soak = Fake(track, listed=True)
        soak.restarted("kill -9")
        assert soak.job is track and track.faulted == ["kill -9"]
        assert track.complete_asked == (kind == "commit")
    gone = JobTrack("j2", "mirror")
    gone.complete_asked = True
    soak = Fake(gone, listed=False)
    soak.restarted("kill -9")
    assert soak.ended == [("j2", "unknown")] and gone.complete_asked
