"""drive-backup: the target (or the pull-mode export) holds the disk as it was when the
job started, whatever clients write meanwhile; policies; jobs that survive kill -9."""

import json
import re
import os
import random
import subprocess
import threading

import pytest

import nbd

import helpers
from conftest import make_image
from faults import FaultSwitch, error_args, wait_until
from helpers import Control

MiB = 1 << 20
SIZE = 16 * MiB


class Writer(helpers.Writer):
    """Random writes, zeroes and trims through its own connection; pause() and go()
    bracket a point in time (pause returns once no change is in flight).  `count`
    counts changes made (idle turns are not steps of helpers.Writer's count)."""

    def __init__(self, uri, size, seed):
        super().__init__(uri, size, seed=seed, lengths=(4096, 65536, 200 * 1024, MiB),
                         align=512, pace=0)
        self.running = threading.Event()
        self.idle = threading.Event()
        self.changes = 0

    @property
    def count(self):
        return self.changes

    @count.setter
    def count(self, value):               # helpers.Writer counts its turns here
        pass

    def step(self):
        if not self.running.is_set():
            self.idle.set()
            self.running.wait(0.05)
            return
        self.idle.clear()
        kind = self.rnd.random()
        n = self.rnd.choice(self.lengths)
        off = self.rnd.randrange(0, (self.size - n) // 512) * 512
        if kind < 0.8:
            self.h.pwrite(self.rnd.randbytes(n), off)
        elif kind < 0.9:
            self.h.zero(n, off)
        else:
            self.h.trim(n, off)
        self.changes += 1

    def reconnect(self, uri):
        """After the server restarted (kill -9)."""
        self.h = nbd.NBD()
        self.h.connect_uri(uri)

    def pause(self):
        self.running.clear()
        self.idle.wait(10)
        assert self.idle.is_set()

    def go(self):
        self.idle.clear()
        self.running.set()

    def finish(self):
        self.running.set()
        super().finish()


class Rig:
    def __init__(self, servers, tmp_path, connect, size=SIZE, switch=None, **disk_params):
        self.tmp, self.servers, self.size = tmp_path, servers, size
        self.base = make_image(tmp_path / "base.img", size,
                               [(0, 2 * MiB), (size // 3 + 4097, size // 5), (size - MiB, MiB)],
                               seed=11)
        self.ctl = tmp_path / "ctl.sock"
        self.disk = servers.overlay(tmp_path / "ov", base=self.base, control=str(self.ctl),
                                    **disk_params)
        self.target_path = tmp_path / "target.img"
        with open(self.target_path, "wb") as f:
            f.truncate(size)
        if switch is None:
            self.target = servers.nbdkit("file", str(self.target_path))
        else:               # target writes fail while the switch is on
            self.target = servers.nbdkit("file", str(self.target_path),
                                         *error_args(switch),
                                         filters=["error"])
        self.switch = switch
        self.qmp = Control(self.ctl)
        self.connect = connect
        self.h = connect(self.disk.uri)

    def disk_bytes(self):
        return bytes(self.h.pread(self.size, 0))

    def backup(self, **args):
        args.setdefault("sync", "full")
        args.setdefault("target", self.target.uri)
        return self.qmp("drive-backup", device="disk0", **args)

    def write_some(self, seed, count=40):
        rnd = random.Random(seed)
        for _ in range(count):
            n = rnd.choice((4096, 65536, 300 * 1024))
            off = rnd.randrange(0, (self.size - n) // 512) * 512
            self.h.pwrite(rnd.randbytes(n), off)


@pytest.fixture
def rig(servers, tmp_path, connect):
    r = Rig(servers, tmp_path, connect)
    yield r
    r.qmp.close()


def test_full_backup_is_the_disk_at_the_start_while_a_client_writes(rig):
    rig.write_some(1)
    w = Writer(rig.disk.uri, rig.size, seed=2)
    w.start()
    w.go()
    wait_until(lambda: w.count > 20)
    w.pause()
    model = rig.disk_bytes()
    rig.backup(speed=16 * MiB)
    w.go()
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
    w.finish()
    assert w.count > 40
    assert rig.target_path.read_bytes() == model
    names = [n for n in rig.qmp.names() if not n.startswith("BLOCK_IO")]
    assert "BLOCK_JOB_READY" not in names
    assert names[:2] == ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running"]
    completed = [e for e in rig.qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"][0]
    assert completed["data"]["type"] == "backup" and "error" not in completed["data"]
    assert completed["data"]["offset"] == completed["data"]["len"] > 0
    # Its scratch files are gone with the job.
    assert not any(n.endswith((".cbw", ".needed", ".saved"))
                   for n in os.listdir(rig.tmp / "ov" / "jobs"))


def test_top_backup_copies_only_what_the_overlay_holds(rig):
    rig.write_some(3, count=10)
    model = rig.disk_bytes()
    rig.backup(sync="top")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    got = rig.target_path.read_bytes()
    # Where the target got something, it is the disk; elsewhere it stayed zero.
    differs_from_zero = [i for i in range(0, rig.size, 65536) if got[i:i + 65536] != bytes(65536)]
    assert differs_from_zero, "nothing copied"
    for i in range(0, rig.size, 65536):
        block = got[i:i + 65536]
        assert block == model[i:i + 65536] or block == bytes(65536)
    copied = sum(65536 for i in range(0, rig.size, 65536)
                 if got[i:i + 65536] != bytes(65536))
    assert copied < rig.size // 2              # the base's data was not copied


def test_sync_none_copies_only_the_old_bytes_of_what_clients_overwrite(rig):
    model = rig.disk_bytes()
    rig.backup(sync="none", job_id="cbw")
    rig.h.pwrite(b"\xaa" * 65536, 4 * MiB)
    rig.h.pwrite(b"\xbb" * 4096, 9 * MiB + 4096)
    rig.h.flush()
    wait_until(lambda: rig.target_path.read_bytes()[4 * MiB:4 * MiB + 65536]
               == model[4 * MiB:4 * MiB + 65536], timeout=30)
    rig.qmp("block-job-cancel", device="cbw")
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    got = rig.target_path.read_bytes()
    g = 65536                                   # the cluster size: the CBW granule
    for start in (4 * MiB, 9 * MiB):
        assert got[start:start + g] == model[start:start + g]
    untouched = [i for i in range(0, rig.size, g) if i not in (4 * MiB, 9 * MiB)]
    assert all(got[i:i + g] == bytes(g) for i in untouched)


def test_pull_mode_export_serves_the_point_in_time_to_nbdcopy_and_nbdinfo(rig, tmp_path):
    rig.write_some(5)
    w = Writer(rig.disk.uri, rig.size, seed=6)
    w.start()
    model = rig.disk_bytes()
    rig.backup(sync="none", target="export:pit", job_id="pull")
    w.go()
    wait_until(lambda: w.count > 30)
    view_uri = rig.disk.uri.replace(":///?", ":///pit?")
    out = tmp_path / "pulled.img"
    subprocess.run(["nbdcopy", view_uri, str(out)], check=True, timeout=120)
    assert out.read_bytes() == model
    mapped = json.loads(subprocess.run(["nbdinfo", "--map", "--json", view_uri], check=True,
                                       capture_output=True, text=True, timeout=60).stdout)
    assert sum(e["length"] for e in mapped) == rig.size
    v = rig.connect(view_uri)
    assert v.is_read_only()
    assert bytes(v.pread(rig.size, 0)) == model
    w.finish()
    rig.qmp("block-job-cancel", device="pull")
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    listed = subprocess.run(["nbdinfo", "--list", rig.disk.uri], capture_output=True,
                            text=True, timeout=60).stdout
    assert 'export="pit"' not in listed


def test_export_names_and_targets_are_checked_before_any_job_exists(rig):
    from qemu.qmp import ExecuteError
    with pytest.raises(ExecuteError, match="must provide a valid bitmap name"):
        rig.backup(sync="incremental")
    with pytest.raises(ExecuteError, match="Invalid export name"):
        rig.backup(target="export:../x")
    with pytest.raises(ExecuteError, match="Only mode 'existing'"):
        rig.backup(mode="absolute-paths")
    assert rig.qmp("query-block-jobs") == []


@pytest.fixture
def faulty(servers, tmp_path, connect):
    r = Rig(servers, tmp_path, connect, switch=FaultSwitch(tmp_path / "fault"))
    yield r
    r.qmp.close()


def test_target_error_report_ends_the_backup_with_the_error(faulty):
    faulty.switch.on()
    faulty.backup(on_target_error="report")
    e = faulty.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert e["data"]["error"] == "Input/output error"
    errors = [e["data"] for e in faulty.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]
    assert errors and all(d["operation"] == "write" and d["action"] == "report"
                          for d in errors)


def test_target_error_stop_pauses_keeps_the_point_in_time_and_resume_completes(faulty):
    model = faulty.disk_bytes()
    faulty.switch.on()
    faulty.backup(on_target_error="stop", speed=32 * MiB)
    faulty.qmp.wait_event("BLOCK_JOB_ERROR", timeout=60, action="stop")
    faulty.qmp.wait_status("disk0", "paused")
    assert faulty.qmp.job("disk0")["io-status"] == "failed"
    faulty.write_some(7)                       # while paused: saved first
    faulty.switch.off()
    faulty.qmp("block-job-resume", device="disk0")
    faulty.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert faulty.target_path.read_bytes() == model


def test_target_error_ignore_retries_and_still_delivers_the_point_in_time(faulty):
    model = faulty.disk_bytes()
    faulty.switch.on()
    faulty.backup(on_target_error="ignore")
    faulty.qmp.wait_event("BLOCK_JOB_ERROR", timeout=60, action="ignore")
    faulty.write_some(8)
    faulty.switch.off()
    e = faulty.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=90)
    assert "error" not in e["data"]
    assert faulty.target_path.read_bytes() == model


@pytest.mark.slow
def test_kill_9_at_random_moments_the_resumed_backup_delivers_the_same_point_in_time(
        servers, tmp_path, connect):
    rnd = random.Random(42)
    rig = Rig(servers, tmp_path, connect, size=8 * MiB)
    rounds = 30
    for round_ in range(rounds):
        with open(rig.target_path, "wb") as f:
            f.truncate(rig.size)
        rig.write_some(100 + round_, count=20)
        rig.h.flush()
        model = rig.disk_bytes()
        mode = ("push", "paused", "pull")[round_ % 3]
        if mode == "pull":
            rig.backup(sync="none", target="export:pit", job_id="b")
        else:
            rig.backup(job_id="b", speed=4 * MiB)
            if mode == "paused":
                rig.qmp("block-job-pause", device="b")
        w = Writer(rig.disk.uri, rig.size, seed=round_)
        w.start()
        w.go()
        wait_until(lambda: w.count > rnd.randrange(3, 30), timeout=30)
        if mode == "pull":
            v = connect(rig.disk.uri.replace(":///?", ":///pit?"))
            assert bytes(v.pread(rig.size // 2, 0)) == model[:rig.size // 2]
        rig.disk.kill9()
        w.stop_event.set()
        w.running.set()
        w.join(10)
        rig.qmp.close()
        rig.disk = servers.restart(rig.disk)
        rig.qmp = Control(rig.ctl)
        rig.h = connect(rig.disk.uri)
        jobs = rig.qmp("query-block-jobs")
        assert [j["device"] for j in jobs] == ["b"], (round_, mode, jobs)
        if mode == "pull":
            v = connect(rig.disk.uri.replace(":///?", ":///pit?"))
            assert bytes(v.pread(rig.size, 0)) == model, (round_, mode)
            rig.qmp("block-job-cancel", device="b")
            rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
            continue
        if jobs[0]["paused"]:
            rig.qmp("block-job-resume", device="b")
        rig.qmp("block-job-set-speed", device="b", speed=0)
        rig.write_some(200 + round_, count=10)
        rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert rig.target_path.read_bytes() == model, (round_, mode)
    rig.qmp.close()


def test_jobctl_backup_waits_for_the_end_and_status_shows_the_job(rig):
    import sys
    jobctl = os.path.join(os.path.dirname(sys.executable), "jobctl")
    model = rig.disk_bytes()
    done = subprocess.run([jobctl, "--socket", str(rig.ctl), "backup", "disk0",
                           rig.target.uri, "--wait", "--timeout", "120"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout.lower()
    assert rig.target_path.read_bytes() == model
    rig.backup(sync="none", target="export:view", job_id="v")
    status = subprocess.run([jobctl, "--socket", str(rig.ctl), "status", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    jobs = json.loads(status.stdout)
    listed = jobs if isinstance(jobs, list) else jobs.get("jobs", [])
    assert [j.get("type") for j in listed if j.get("device", j.get("id")) == "v"] == ["backup"]


def test_cancel_with_a_stalled_target_frees_a_client_waiting_to_copy_before_write(
        servers, tmp_path, connect):
    rig = Rig(servers, tmp_path, connect, size=8 * MiB)
    rig.target.stop()
    requests = tmp_path / "target-requests.log"
    rig.target = servers.nbdkit("file", str(rig.target_path), "delay-write=60",
                                "logfile=%s" % requests, filters=["log", "delay"])
    rig.backup(job_id="slow")
    # The copy of the first chunk reached the target (the log filter sees it
    # before the delay filter holds it).
    wait_until(lambda: requests.exists() and "Write id=" in requests.read_text()
               and "offset=0x0 " in requests.read_text(), timeout=20)
    h2 = connect(rig.disk.uri)
    done = threading.Event()

    def write():
        h2.pwrite(b"\x55" * 4096, 0)        # the first chunk: its copy is stuck in flight
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert not done.wait(1.0)               # held: its old bytes are still being copied
    rig.qmp("block-job-cancel", device="slow", force=True)
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=15)
    assert done.wait(15), "the client's write stayed blocked after the cancel"
    assert bytes(rig.h.pread(4096, 0)) == b"\x55" * 4096
    rig.qmp.close()


def _small_fs_disk(servers, tmp_path, size_mib):
    """Our plugin with its state directory on a tmpfs of size_mib MiB (a private mount
    namespace: only nbdkit sees it); None where tmpfs cannot be mounted."""
    from conftest import PLUGIN, Server
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs %s"
                       % probe], capture_output=True).returncode != 0:
        return None
    fs = tmp_path / "fs"
    fs.mkdir()
    sock, log, control = tmp_path / "small.sock", tmp_path / "small.log", tmp_path / "sctl.sock"
    script = ("mount -t tmpfs -o size={n}m tmpfs {fs} && exec nbdkit -f -v -U {sock} python "
              "{plugin} overlay={fs}/ov size=16M control={control}").format(
                  n=size_mib, fs=fs, sock=sock, plugin=PLUGIN, control=control)
    srv = Server(["unshare", "-m", "sh", "-c", script], sock, log, control=str(control))
    servers.started.append(srv)
    return srv.wait_ready()


@pytest.mark.parametrize("on_cbw_error", ["break-guest-write", "break-snapshot"])
def test_copy_before_write_failing_for_space_follows_on_cbw_error(servers, tmp_path, connect,
                                                                   on_cbw_error):
    import nbd
    srv = _small_fs_disk(servers, tmp_path, 6)
    if srv is None:
        pytest.skip("needs root to mount a tmpfs in a private mount namespace")
    h = connect(srv.uri)
    for off in range(0, 4 * MiB, MiB):        # the overlay holds these: rewrites need no space
        h.pwrite(bytes([off // MiB + 1]) * MiB, off)
    h.flush()
    target = tmp_path / "t.img"
    with open(target, "wb") as f:
        f.truncate(16 * MiB)
    qmp = Control(srv.control)
    try:
        qmp("drive-backup", device="disk0", target=str(target), sync="none", job_id="b",
            on_cbw_error=on_cbw_error)
        failed = None
        for off in range(0, 4 * MiB, 65536):   # each rewrite saves 64K first: the fs fills
            try:
                h.pwrite(b"\xee" * 65536, off)
            except nbd.Error as e:
                failed = (off, e.errno)
                break
        if on_cbw_error == "break-guest-write":
            assert failed is not None and failed[1] == "ENOSPC", failed
            assert qmp.job("b") is not None          # the backup goes on
            assert bytes(h.pread(65536, failed[0])) != b"\xee" * 65536   # not written
            qmp("block-job-cancel", device="b")
            qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        else:
            assert failed is None                    # every client write went through
            e = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
            assert e["data"]["error"] == "No space left on device"
            assert bytes(h.pread(65536, 3 * MiB)) == b"\xee" * 65536
    finally:
        qmp.close()


# A slow file target, one request at a time: 20 ms a write, a second a flush (nbdkit's
# delay filter cannot slow flushes), so answered copies wait long for the flush that
# makes them durable; with multi-conn, so a restarted job can recognise the instance.
SLOW_FLUSH_PLUGIN = """
import os, time
import nbdkit
API_VERSION = 2
path = None
def config(key, value):
    global path
    path = value
def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS
def open(readonly):
    return os.open(path, os.O_RDWR)
def get_size(h):
    return os.fstat(h).st_size
def can_multi_conn(h):
    return True
def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)
def pwrite(h, buf, offset, flags):
    time.sleep(0.02)
    os.pwrite(h, buf, offset)
def flush(h, flags):
    time.sleep(1.0)
    os.fdatasync(h)
def close(h):
    os.close(h)
"""

_TARGET_WRITE = re.compile(r" (?:Write|Zero) id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+) ")


def _target_bytes_written(log_path, start=0):
    """Bytes the target was asked to write or zero after `start` characters of its log."""
    text = log_path.read_text()[start:] if log_path.exists() else ""
    return sum(int(n, 16) for n in _TARGET_WRITE.findall(text))


@pytest.mark.slow
@pytest.mark.parametrize("same_target", [True, False])
def test_a_resumed_backup_does_not_copy_again_what_the_same_target_instance_answered(
        servers, tmp_path, connect, same_target):
    size = 48 * MiB
    rig = Rig(servers, tmp_path, connect, size=size)
    rig.target.stop()
    requests = tmp_path / "requests.log"

    plugin = tmp_path / "slowflush.py"
    plugin.write_text(SLOW_FLUSH_PLUGIN)

    def target_server():
        # Slow flushes: copies the target answered stay unflushed for a while.
        return servers.nbdkit("python", str(plugin), "file=%s" % rig.target_path,
                              "logfile=%s" % requests, filters=["log"])

    rig.target = target_server()
    rig.write_some(9, count=30)
    model = rig.disk_bytes()
    rig.backup(job_id="b")
    wait_until(lambda: rig.qmp.job("b")["offset"] >= size // 2, timeout=60, interval=0.01)
    rig.disk.kill9()
    at_kill = requests.stat().st_size
    copied_before = _target_bytes_written(requests)
    if not same_target:                      # the same file, another server process
        rig.target.stop()
        rig.target = servers.restart(rig.target)
        at_kill = requests.stat().st_size
    rig.qmp.close()
    rig.disk = servers.restart(rig.disk)
    rig.qmp = Control(rig.ctl)
    rig.h = connect(rig.disk.uri)
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert rig.target_path.read_bytes() == model
    again = _target_bytes_written(requests, at_kill)
    if same_target:
        # Only what the target never answered (one request may have been answered
        # after our process died).
        assert again <= size - copied_before + 2 * MiB, (again, copied_before)
        assert "Backup trusts its copies job=b" in rig.disk.log()
    else:
        # Another instance: every copy no flush covered is made again.
        assert again > size - copied_before
        assert "trusts its copies" not in rig.disk.log()
    rig.qmp.close()
