"""Jobs outlive the process (docs/jobs.md): real nbdkit, real kills, a client writing.

The target is served by `nbdkit --filter=log file`, so the bytes written to it
after each restart are counted from its log and printed (run with -s to see
them).  A kill -9 may lose the writes after the client's last completed
flush: the model of the disk treats those bytes as uncertain until they are
read back after the restart; every other byte must be exactly what the
client wrote.
"""

import json
import os
import random
import re
import time

import nbd
import pytest

from conftest import make_image
from faults import PauseControl, wait_until
from helpers import Control, Writer
from netrig import nbdkit_tcp

MiB = 1 << 20
SIZE = 32 * MiB
SPEED = 24 * MiB

_WRITE_RE = re.compile(r"connection=\d+ Write id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+) ")


def target_written(log_path, since=0):
    """Bytes the target's log filter saw written from byte `since` of its log; (bytes, end)."""
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
        end = f.tell()
    return sum(int(m.group(1), 16) for m in _WRITE_RE.finditer(text)), end


class ModelWriter(Writer):
    """Random 4K-64K writes, a flush after every fourth; knows which ones a crash may lose."""

    def __init__(self, uri, model, seed, pace=0.01):
        # nbd.Error: the server was killed under it (the test did it).
        super().__init__(uri, SIZE, seed=seed, pace=pace, tolerate=(nbd.Error,))
        self.model = model
        self.pending = []            # written (or being written) since the last good flush

    def step(self):
        length = self.rnd.randrange(4096, 65537) // 512 * 512
        offset = self.rnd.randrange(0, (SIZE - length) // 512) * 512
        data = self.rnd.randbytes(length)
        self.pending.append((offset, data))
        self.h.pwrite(data, offset)
        if (self.count + 1) % 4 == 0:
            self._flush()

    def _flush(self):
        self.h.flush()
        for off, d in self.pending:
            self.model.data[off:off + len(d)] = d
        self.pending = []

    def finish(self, flush=True):
        """Stop; with flush, make every write certain (the server is alive)."""
        self.stop_event.set()
        self.join()
        if flush:
            self._flush()
        else:
            self.model.uncertain += [(off, len(d)) for off, d in self.pending]
        return super().finish()


class Model:
    """What the disk must hold: exact bytes, and ranges a crash may have left either way."""

    def __init__(self, data):
        self.data = bytearray(data)
        self.uncertain = []

    def check_and_adopt(self, actual):
        mask = bytearray(len(self.data))
        for off, n in self.uncertain:
            mask[off:off + n] = b"\x01" * n
        pos = 0
        while pos < len(mask):
            start = mask.find(b"\x00", pos)
            if start < 0:
                break
            end = mask.find(b"\x01", start)
            if end < 0:
                end = len(mask)
            assert actual[start:end] == self.data[start:end], \
                "flushed data lost in [%d, %d)" % (start, end)
            pos = end
        self.data = bytearray(actual)
        self.uncertain = []


class Rig:
    """Overlay server (restartable), a target behind the log filter, QMP, the model."""

    def __init__(self, servers, tmp_path, name="r", tcp=False, **params):
        self.servers, self.tmp = servers, tmp_path
        self.base = make_image(tmp_path / ("%s-base.img" % name), SIZE,
                               [(0, SIZE // 2), (SIZE // 2 + MiB, SIZE // 2 - MiB)], seed=5)
        self.model = Model(open(self.base, "rb").read())
        self.overlay_dir = tmp_path / ("%s-ov" % name)
        self.ctl = tmp_path / ("%s-ctl.sock" % name)
        self.target_path = tmp_path / ("%s-target.img" % name)
        with open(self.target_path, "wb") as f:
            f.truncate(SIZE)
        self.target_log = tmp_path / ("%s-target.log" % name)
        if tcp:     # over 127.0.0.1: no target instance to trust, a restart compares
            self.target = nbdkit_tcp(servers, name, ["--filter=log", "file", str(self.target_path),
                                                     "logfile=%s" % self.target_log])
        else:
            self.target = servers.nbdkit("file", str(self.target_path),
                                         "logfile=%s" % self.target_log, filters=["log"])
        self.log_pos = 0
        self.params = params
        self.disk = servers.overlay(self.overlay_dir, base=self.base, control=str(self.ctl),
                                    **params)
        self.qmp = Control(self.ctl)

    def mirror(self, **args):
        args.setdefault("sync", "full")
        args.setdefault("speed", SPEED)
        args.setdefault("granularity", 65536)
        self.qmp("drive-mirror", device="disk0", target=self.target.uri, **args)

    def writer(self, seed):
        w = ModelWriter(self.disk.uri, self.model, seed)
        w.start()
        return w

    def kill9(self):
        self.qmp.close()
        self.disk.kill9()

    def disk_logs(self):
        """The log files of every overlay server this rig started."""
        return sorted({s.log_path for s in self.servers.started
                       if getattr(s, "control", None) == str(self.ctl)})

    def restart(self, **params):
        if params:
            argv = [a for a in self.disk.argv if not a.startswith("job-restart=")]
            argv += ["%s=%s" % (k.replace("_", "-"), v) for k, v in params.items()]
            self.disk.argv = argv
        self.disk = self.servers.restart(self.disk)
        self.qmp = Control(self.ctl)
        return self.qmp

    def restart_target(self):
        """The target server crashes and comes back: a new instance, which may have
        lost what it had answered, so a restored mirror compares instead of trusting."""
        self.target.kill9()
        self.target = self.servers.restart(self.target)
        self.log_pos = min(self.log_pos, os.path.getsize(self.target_log))

    def disk_bytes(self):
        h = nbd.NBD()
        h.connect_uri(self.disk.uri)
        try:
            return bytes(h.pread(SIZE, 0)) if SIZE <= 32 * MiB else b"".join(
                bytes(h.pread(32 * MiB, o)) for o in range(0, SIZE, 32 * MiB))
        finally:
            h.shutdown()

    def check_disk(self):
        self.model.check_and_adopt(self.disk_bytes())

    def recopied(self):
        """Bytes written to the target since the last call."""
        n, self.log_pos = target_written(self.target_log, self.log_pos)
        return n

    def records(self):
        folder = self.overlay_dir / "jobs"
        if not folder.exists():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}

    def recovered(self):
        return self.qmp.wait_event("JOB_RECOVERED")["data"]

    def active(self):
        return self.qmp.execute("query-block")[0]["active"]


def _ready_or_dropped(rig):
    """After a restart: wait until the job is READY again, or find it pivoted."""
    if rig.active() is not None:
        return "pivoted"
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    return "ready"


def test_kill9_at_random_moments_of_mirror_with_a_writing_client(servers, tmp_path, capsys):
    seed = int(os.environ.get("DURABLE_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print("\nseed=%d (DURABLE_SEED=... to repeat)" % seed)
    rounds = 0
    for cycle in range(3):
        # Cycles 0 and 2: the target on a Unix socket lives on across the kills (the same
        # instance: a restart trusts what it had copied); cycle 1 over TCP (it compares).
        rig = Rig(servers, tmp_path, name="c%d" % cycle, tcp=cycle == 1)
        w = rig.writer(seed + cycle)
        rig.mirror()
        # Kills while the bulk copy runs, then while ready, then during complete.
        for phase in ["bulk"] * 4 + ["ready"] * 6:
            if phase == "bulk":
                time.sleep(rnd.uniform(0.05, 0.6))
            else:
                rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
                time.sleep(rnd.uniform(0.0, 1.2))
            info = rig.qmp.job("disk0")
            rig.kill9()
            w.finish(flush=False)
            copied = rig.recopied()
            qmp = rig.restart()
            rec = rig.recovered()
            assert rec["id"] == "disk0" and rec["after"] == "crash" and rec["status"] == "running"
            job = qmp.job("disk0")
            assert job["offset"] <= job["len"] and job["speed"] == SPEED
            rig.check_disk()
            w = rig.writer(rnd.randrange(1 << 30))
            rounds += 1
            print("cycle %d round %2d %-5s killed at offset %9d/%9d ready=%-5s | copied before "
                  "kill %9d | restart: dirty %9d" % (
                      cycle, rounds, phase, info["offset"] if info else -1,
                      info["len"] if info else -1, bool(info and info["ready"]),
                      copied, rec["dirty"]))
        # complete: the client stops and flushes, the disk's content is then final.
        rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
        w.finish(flush=True)
        expected = rig.disk_bytes()
        rig.model.check_and_adopt(expected)
        rig.qmp("block-job-complete", device="disk0")
        if cycle < 2:
            # Kill during complete: served wholly from source (job back) or from target.
            time.sleep(rnd.uniform(0.0, 0.003) if cycle == 0 else rnd.uniform(0.0, 0.1))
            rig.kill9()
            qmp = rig.restart()
            state = _ready_or_dropped(rig)
            rounds += 1
            print("cycle %d round %2d complete killed: %s" % (cycle, rounds, state))
            if state == "ready":
                qmp("block-job-complete", device="disk0")
                rig.qmp.wait_status("disk0", "null", timeout=120)
            else:
                assert rig.qmp.execute("query-block-jobs") == []
        else:
            rig.qmp.wait_status("disk0", "null", timeout=120)
        assert rig.active() == rig.target.uri
        assert rig.records() == {}
        assert rig.target_path.read_bytes() == expected
        assert rig.disk_bytes() == expected
        log = "".join(open(p, errors="replace").read() for p in rig.disk_logs())
        print("cycle %d: target == disk after completion; target writes after the last "
              "restart %d; restarts that trusted %d, compared %d" % (
                  cycle, rig.recopied(), log.count("Mirror trusts its copies"),
                  log.count("Mirror verified")))
        rig.qmp.close()
        rig.disk.stop()
    assert rounds >= 30


def test_mirror_killed_half_way_copies_about_the_other_half(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    rig.mirror(speed=16 * MiB)
    wait_until(lambda: rig.qmp.job("disk0")["offset"] >= SIZE // 2, timeout=60, interval=0.01)
    offset = rig.qmp.job("disk0")["offset"]
    rig.kill9()
    before = rig.recopied()
    rig.restart()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    after = rig.recopied()
    print("\nkilled at offset %d: %d bytes copied before, %d after the restart (%.2f of the disk)"
          % (offset, before, after, after / SIZE))
    assert after < 0.75 * SIZE
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def test_restart_compares_what_was_copied_and_copies_only_what_differs(servers, tmp_path):
    """Regions whose copies the target answered are marked COPIED (2) in the intent
    log; a restarted mirror compares them with the target instead of copying them,
    and copies only where the target differs.  The kill leaves its log as it was;
    six regions the first half's copies reached are then marked COPIED, as the job
    marks them between a copy and the flush that clears them, and the target
    crashes too and comes back without 100 KiB of one of them."""
    rig = Rig(servers, tmp_path)
    copied, set_bytes, marked, region = _kill_half_way_with_six_copied(rig)
    rig.target.kill9()
    with open(rig.target_path, "r+b") as f:
        f.seek(copied[2] * region + 12345)
        f.write(b"\xee" * 100000)
    rig.restart_target()
    rig.recopied()
    rig.restart()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    after = rig.recopied()
    verified = re.findall(r"Mirror verified job=disk0 equal=(\d+) different=(\d+)", rig.disk.log())
    assert verified, rig.disk.log()
    equal, different = map(int, verified[-1])
    print("\nset %d, COPIED %d; after the restart: equal %d, different %d, written %d"
          % (set_bytes, marked * region, equal, different, after))
    assert (equal, different) == ((marked - 1) * region, region)
    assert after <= set_bytes + region             # the equal ones were not written
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def _kill_half_way_with_six_copied(rig):
    """Mirror to half way, kill -9, mark six regions of the first half COPIED (as the
    job marks them between a copy and the flush that clears them)."""
    rig.mirror(speed=16 * MiB)
    wait_until(lambda: rig.qmp.job("disk0")["offset"] >= SIZE // 2, timeout=60, interval=0.01)
    rig.kill9()
    intent = rig.overlay_dir / "jobs" / "disk0.intent"
    marks = bytearray(intent.read_bytes())
    region = SIZE // len(marks)
    copied = [i for i in range(len(marks) // 2) if marks[i] == 0][:6]
    assert len(copied) == 6, marks
    for i in copied:
        marks[i] = 2
    intent.write_bytes(marks)
    set_bytes = sum(region for b in marks if b == 1)
    marked = marks.count(2)          # the six, and any the job had marked itself
    return copied, set_bytes, marked, region


def test_restart_with_the_same_target_instance_trusts_what_it_had_copied(servers, tmp_path):
    """The same target server (same process, Unix socket, multi-conn) still holds what
    it answered: the COPIED regions are neither compared nor copied, only flushed;
    the record names the instance it vouches for."""
    rig = Rig(servers, tmp_path)
    copied, set_bytes, marked, region = _kill_half_way_with_six_copied(rig)
    instance = rig.records()["disk0"]["target-instance"]
    assert instance["kind"] == "nbd-unix" and instance["pid"] == rig.target.pid
    rig.recopied()
    rig.restart()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    after = rig.recopied()
    log = rig.disk.log()
    trusted = re.findall(r"Mirror trusts its copies job=disk0 bytes=(\d+)", log)
    print("\nset %d, COPIED %d; after the restart: trusted %s, written %d"
          % (set_bytes, marked * region, trusted, after))
    assert trusted == [str(marked * region)] and "Mirror verified" not in log
    assert after <= set_bytes                        # the COPIED ones were not written
    assert rig.records()["disk0"]["target-instance"] == instance
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def test_a_new_target_instance_is_vouched_for_only_once_ready(servers, tmp_path):
    """After the target restarted, the record names no instance until the comparison
    and the copy are done (READY): a crash before that compares again."""
    rig = Rig(servers, tmp_path)
    _kill_half_way_with_six_copied(rig)
    rig.restart_target()
    rig.restart()
    wait_until(lambda: rig.records()["disk0"]["target-instance"] is None, timeout=30)
    assert not rig.qmp.job("disk0")["ready"]
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    wait_until(lambda: rig.records()["disk0"]["target-instance"] is not None, timeout=30)
    assert rig.records()["disk0"]["target-instance"]["pid"] == rig.target.pid
    assert "Mirror verified" in rig.disk.log()


def test_a_lost_target_connection_takes_the_vouching_back(servers, tmp_path):
    """The target restarts under a running job (on-target-error=stop, then resume): the
    record stops naming an instance as the loss is seen, and this process never vouches
    again, so a crash after it compares what it had copied instead of trusting it."""
    rig = Rig(servers, tmp_path)
    rig.mirror(on_target_error="stop")
    wait_until(lambda: (rig.records().get("disk0") or {}).get("target-instance"), timeout=30)
    rig.target.kill9()
    rig.qmp.wait_status("disk0", "paused", timeout=60)
    assert rig.records()["disk0"]["target-instance"] is None
    rig.target = rig.servers.restart(rig.target)
    rig.qmp("block-job-resume", device="disk0")
    wait_until(lambda: rig.qmp.job("disk0")["offset"] >= SIZE // 2, timeout=60, interval=0.01)
    assert rig.records()["disk0"]["target-instance"] is None
    rig.kill9()
    intent = rig.overlay_dir / "jobs" / "disk0.intent"
    marks = bytearray(intent.read_bytes())
    first = [i for i in range(len(marks) // 2) if marks[i] == 0][:2]
    for i in first:                    # copied after the reconnect, as far as the log says
        marks[i] = 2
    intent.write_bytes(marks)
    rig.restart()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    log = rig.disk.log()
    assert "Mirror verified" in log and "Mirror trusts its copies" not in log
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def _sigterm(rig, bound=5.0):
    rig.qmp.close()
    t0 = time.monotonic()
    assert rig.disk.stop(timeout=20) == 0
    took = time.monotonic() - t0
    assert took < bound, took
    return took


def test_sigterm_saves_the_job_and_it_goes_on(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    w = rig.writer(1)
    rig.mirror()
    for phase in ("bulk", "bulk", "ready", "ready"):
        if phase == "ready":
            rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
        else:
            time.sleep(0.3)
        w.finish(flush=True)           # nbdkit waits for its clients on SIGTERM
        took = _sigterm(rig)
        rec = rig.records()["disk0"]
        assert rec["shutdown"] is True and rec["paused"] is False
        qmp = rig.restart()
        got = rig.recovered()
        assert got["after"] == "shutdown" and got["status"] == "running"
        assert qmp.names()[:3] == ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running",
                                   "JOB_RECOVERED"]
        rig.check_disk()
        print("\nSIGTERM in %s: exit took %.2fs; restart dirty %d" % (phase, took, got["dirty"]))
        w = rig.writer(7)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=120)
    w.finish(flush=True)
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == expected


def test_sigterm_with_a_stalled_target_exits_within_5s(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    control = PauseControl(tmp_path / "pause.sock")
    stalled = servers.nbdkit("file", str(rig.target_path), "pause-control=%s" % control.path,
                             filters=["pause"])
    rig.qmp("drive-mirror", device="disk0", target=stalled.uri, sync="full", speed=SPEED)
    time.sleep(0.3)
    control.pause()                                   # the target stops answering
    time.sleep(0.3)
    took = _sigterm(rig)
    print("\nSIGTERM with a stalled target: exit took %.2fs" % took)
    assert rig.records()["disk0"]["shutdown"] is True
    # The target comes back: the job resumes and completes.
    control.resume()
    qmp = rig.restart()
    assert rig.recovered()["after"] == "shutdown"
    qmp("block-job-set-speed", device="disk0", speed=0)
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_user_paused_job_comes_back_paused(servers, tmp_path, stop):
    rig = Rig(servers, tmp_path)
    rig.mirror(speed=4 * MiB, on_target_error="stop")
    rig.qmp.wait_status("disk0", "running")
    rig.qmp("block-job-pause", device="disk0")
    rig.qmp.wait_status("disk0", "paused")
    offset = rig.qmp.job("disk0")["offset"]
    rig.kill9() if stop == "kill9" else _sigterm(rig)
    qmp = rig.restart()
    rec = rig.recovered()
    assert rec["status"] == "paused" and rec["io-status"] == "ok"
    qmp.wait_status("disk0", "paused")
    assert qmp.names().count("JOB_STATUS_CHANGE:created") == 1
    job = qmp.job("disk0")
    assert job["paused"] and job["io-status"] == "ok" and job["offset"] >= offset
    assert job["speed"] == 4 * MiB
    qmp("block-job-resume", device="disk0")
    qmp("block-job-set-speed", device="disk0", speed=0)
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def test_error_paused_job_comes_back_paused_with_its_io_status(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    rig.mirror(on_target_error="stop")
    rig.qmp.wait_status("disk0", "running")
    rig.target.kill9()                                 # every write fails: stop
    rig.qmp.wait_status("disk0", "paused", timeout=60)
    assert rig.qmp.job("disk0")["io-status"] == "failed"
    rig.kill9()
    qmp = rig.restart()                                # the target is still down
    rec = rig.recovered()
    assert rec["status"] == "paused" and rec["io-status"] == "failed"
    qmp.wait_status("disk0", "paused")
    assert qmp.job("disk0")["io-status"] == "failed"
    rig.target = rig.servers.restart(rig.target)
    qmp("block-job-resume", device="disk0")
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


@pytest.mark.parametrize("policy,expect", [("report", "ends"), ("stop", "pauses"),
                                           ("ignore", "retries")])
def test_unreachable_target_at_restart_is_an_io_error_for_the_policy(servers, tmp_path, policy,
                                                                     expect):
    rig = Rig(servers, tmp_path)
    rig.mirror(on_target_error=policy)
    rig.qmp.wait_status("disk0", "running")
    time.sleep(0.2)
    rig.kill9()
    rig.target.kill9()
    qmp = rig.restart()                                # starts: the disk serves
    rig.check_disk()
    err = qmp.wait_event("BLOCK_JOB_ERROR", timeout=30)["data"]
    assert err["operation"] == "write"
    if expect == "ends":
        assert err["action"] == "report"
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
        assert "error" in done
        qmp.wait_status("disk0", "null")
        assert rig.records() == {}
        return
    if expect == "pauses":
        assert err["action"] == "stop"
        qmp.wait_status("disk0", "paused")
    else:
        assert err["action"] == "ignore"
    rig.target = rig.servers.restart(rig.target)
    if expect == "pauses":
        qmp("block-job-resume", device="disk0")
    qmp("block-job-set-speed", device="disk0", speed=0)
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def test_job_restart_pause_brings_jobs_back_user_paused(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    rig.mirror()
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    rig.kill9()
    qmp = rig.restart(job_restart="pause")
    rec = rig.recovered()
    assert rec["status"] == "paused" and rec["ready-seen"] is True
    qmp.wait_status("disk0", "paused")
    assert qmp.job("disk0")["paused"]
    assert "BLOCK_JOB_READY" not in qmp.names()
    qmp("block-job-resume", device="disk0")
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)       # in sync again: READY again
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert rig.target_path.read_bytes() == rig.model.data


def test_cancel_removes_the_record(servers, tmp_path):
    rig = Rig(servers, tmp_path)
    rig.mirror(speed=MiB)
    rig.qmp.wait_status("disk0", "running")
    # (a record being replaced shows disk0.json.tmp for a moment)
    names = {n for n in os.listdir(rig.overlay_dir / "jobs") if not n.endswith(".tmp")}
    assert names == {"disk0.json", "disk0.intent"}
    rig.qmp("block-job-cancel", device="disk0", force=True)
    rig.qmp.wait_status("disk0", "null")
    assert os.listdir(rig.overlay_dir / "jobs") == []
    rig.kill9()
    qmp = rig.restart()
    assert qmp.execute("query-block-jobs") == []


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_stream_over_a_slow_nbd_base_resumes_without_recopy(servers, tmp_path, stop):
    size = 16 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=9)
    base_log = tmp_path / "base.log"
    base_srv = servers.nbdkit("file", base, "-r", "rdelay=150ms", "logfile=%s" % base_log,
                              filters=["log", "delay"])
    ctl = tmp_path / "ctl.sock"
    disk = servers.overlay(tmp_path / "ov", base=base_srv.uri, control=str(ctl))
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(b"W" * MiB, 5 * MiB)
    h.flush()
    h.shutdown()
    qmp = Control(ctl)
    qmp("block-stream", device="disk0")
    wait_until(lambda: qmp.job("disk0")["offset"] >= size // 2, timeout=60, interval=0.01)
    offset = qmp.job("disk0")["offset"]
    qmp.close()
    if stop == "kill9":
        disk.kill9()
    else:
        t0 = time.monotonic()
        assert disk.stop() == 0
        assert time.monotonic() - t0 < 5
    read_before, pos = _base_read(base_log, 0)
    disk = servers.restart(disk)
    qmp = Control(ctl)
    rec = qmp.wait_event("JOB_RECOVERED")["data"]
    assert rec["type"] == "stream" and rec["offset"] >= offset - 2 * MiB
    qmp.wait_status("disk0", "null", timeout=120)
    read_after, _ = _base_read(base_log, pos)
    print("\nstream %s at offset %d: base bytes read before %d, after the restart %d"
          % (stop, offset, read_before, read_after))
    assert read_before + read_after < size + 4 * MiB      # about one pass over the base
    assert qmp.execute("query-block")[0]["base"] is None
    expected = bytearray(open(base, "rb").read())
    expected[5 * MiB:6 * MiB] = b"W" * MiB
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert bytes(h.pread(size, 0)) == bytes(expected)
    h.shutdown()
    qmp.close()


_READ_RE = re.compile(r"connection=\d+ Read id=\d+ offset=0x[0-9a-f]+ count=0x([0-9a-f]+) ")


def _base_read(log_path, since):
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
        end = f.tell()
    return sum(int(m.group(1), 16) for m in _READ_RE.finditer(text)), end


def test_state_dir_versions_1_to_3_are_upgraded_and_a_newer_one_refused(servers, tmp_path):
    ov = tmp_path / "ov"
    disk = servers.overlay(ov, size="4M")
    disk.stop()
    meta = json.loads((ov / "meta.json").read_text())
    assert meta["version"] == 4
    for old in (1, 2, 3):
        meta["version"] = old
        (ov / "meta.json").write_text(json.dumps(meta))
        if old < 3:
            for name in ("clusters.journal.0", "clusters.journal.1"):
                (ov / name).unlink()      # version 2 and older had no map journal
        disk = servers.restart(disk)
        disk.stop()
        assert json.loads((ov / "meta.json").read_text())["version"] == 4
        assert (ov / "clusters.journal.0").is_file() and (ov / "clusters.journal.1").is_file()
    meta["version"] = 5
    (ov / "meta.json").write_text(json.dumps(meta))
    server = servers.restart(disk, wait=False)
    server.proc.wait(30)
    assert server.proc.returncode != 0
    lines = [l for l in server.log().splitlines() if "overlay: error" in l]
    assert len(lines) == 1 and "format version 5" in lines[0], server.log()


def test_a_corrupt_job_record_stops_start_up_with_one_line(servers, tmp_path):
    ov = tmp_path / "ov"
    disk = servers.overlay(ov, size="4M")
    disk.stop()
    (ov / "jobs").mkdir(exist_ok=True)
    (ov / "jobs" / "m.json").write_text("{not json")
    server = servers.restart(disk, wait=False)
    server.proc.wait(30)
    assert server.proc.returncode != 0
    lines = [l for l in server.log().splitlines() if "overlay: error" in l]
    assert len(lines) == 1 and "m.json is corrupt" in lines[0]
    assert (ov / "jobs" / "m.json").exists()                # nothing lost
