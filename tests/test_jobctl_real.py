"""The jobctl executable against the real plugin in nbdkit, with real mirror and stream jobs.

Each test serves a base image through our plugin (overlay + control socket)
and, for mirrors, a raw target file through nbdkit's file plugin. The test
runs the installed `jobctl` as a subprocess with `--socket` pointing at the
plugin's control socket, and checks its output and exit code against what
the plugin reports over QMP and what the disks hold.
"""

import json
import signal
import subprocess
import time

import pytest

from conftest import make_image
from helpers import Control, Writer, jobctl_path
from jobctl.jobs import JOB_KEYS

MiB = 1 << 20
SIZE = 16 * MiB
TIMEOUT = 30        # for one jobctl run; the jobs themselves take well under a second


class Disk:
    """A base image served by our plugin with a control socket, and a mirror target.

    `run()` runs jobctl against the plugin's control socket; `qmp` is an
    independent QMP session used to check what jobctl says.
    """

    def __init__(self, servers, tmp_path, connect, target_filters=(), target_args=()):
        self.tmp = tmp_path
        self.connect = connect
        self.base = make_image(tmp_path / "base.img", SIZE,
                               [(0, 2 * MiB), (SIZE // 3 + 4097, SIZE // 6), (SIZE - MiB, MiB)],
                               seed=11)
        self.sock = str(tmp_path / "ctl.sock")
        self.server = servers.overlay(tmp_path / "ov", base=self.base, control=self.sock)
        self.target_path = tmp_path / "target.img"
        with open(self.target_path, "wb") as f:
            f.truncate(SIZE)
        self.target = servers.nbdkit("file", str(self.target_path), *target_args,
                                     filters=target_filters)
        self.h = connect(self.server.uri)
        self.qmp = Control(self.sock)

    def run(self, *args, timeout=TIMEOUT):
        """Run jobctl against the plugin; return the CompletedProcess (text)."""
        argv = [jobctl_path(), "--socket", self.sock, *map(str, args)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def ok(self, *args, timeout=TIMEOUT):
        """Run jobctl and insist it succeeded; return stdout."""
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result.stdout

    def mirror(self, *options):
        """Start a mirror of disk0 to the target with jobctl; return its stdout."""
        return self.ok("mirror", "disk0", self.target.uri, *options)

    def record(self, job_id="disk0"):
        """The job's record from `jobctl status --json`, or None."""
        for record in json.loads(self.ok("status", "--json"))["jobs"]:
            if record["id"] == job_id:
                return record
        return None

    def wait_status(self, status, job_id="disk0"):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            record = self.record(job_id)
            if record is not None and record["status"] == status:
                return record
            time.sleep(0.05)
        pytest.fail(f"job {job_id!r} did not reach {status!r}; last: {self.record(job_id)}")

    def disk_bytes(self):
        return bytes(self.h.pread(SIZE, 0))

    def target_bytes(self):
        return self.target_path.read_bytes()

    def close(self):
        self.qmp.close()


@pytest.fixture
def disk(servers, tmp_path, connect):
    d = Disk(servers, tmp_path, connect)
    yield d
    d.close()


def last_line(text):
    return text.splitlines()[-1]


# mirror --wait, status

def test_mirror_wait_returns_ready_while_a_client_writes(disk):
    writer = Writer(disk.server.uri, SIZE, seed=5)
    writer.start()
    try:
        result = disk.run("mirror", "disk0", disk.target.uri, "--granularity", "64K", "--wait",
                          "--timeout", "20")
        assert writer.count > 0           # the client was writing during the job
    finally:
        writer.finish()
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' is ready"), \
        result.stderr
    assert disk.qmp.job("disk0")["ready"] is True


def test_mirror_without_wait_prints_the_job_id(disk):
    assert disk.mirror("--speed", "1M") == "disk0\n"
    assert disk.qmp.job("disk0")["type"] == "mirror"


def test_status_table_shows_a_ready_mirror_at_100_percent(disk):
    disk.mirror("--wait")
    lines = disk.ok("status").splitlines()
    assert lines[0].split() == ["ID", "TYPE", "DEVICE", "STATUS", "PROGRESS", "SPEED",
                                "IO-STATUS", "ERROR"]
    assert len(lines) == 3
    assert lines[1].split() == ["disk0", "mirror", "disk0", "ready", "[" + "#" * 20 + "]",
                                "100.0%", "unlimited", "ok", "-"]
    assert lines[2].split() == ["policies:", "on-source-error=report", "on-target-error=report",
                                "copy-mode=background"]


def test_status_json_keys_are_stable_and_values_match_query_block_jobs(disk):
    disk.mirror("--wait")
    document = json.loads(disk.ok("status", "--json"))
    assert list(document) == ["jobs"] and len(document["jobs"]) == 1
    record = document["jobs"][0]
    assert tuple(record) == JOB_KEYS
    [info] = json.loads(disk.ok("qmp", "query-block-jobs"))
    for key, value in info.items():
        assert record[key] == value, key
    assert record["id"] == "disk0" and record["error"] is None
    assert record["progress"] == 1.0 and record["len"] == record["offset"] > 0
    [job] = disk.qmp.execute("query-jobs")
    assert (record["current-progress"], record["total-progress"]) == (
        job["current-progress"], job["total-progress"])


def test_status_without_jobs_says_no_jobs(disk):
    assert disk.ok("status") == "no jobs\n"
    assert json.loads(disk.ok("status", "--json")) == {"jobs": []}


# events

def attach_events(disk, background, *args):
    """Start `jobctl --debug events ARGS`; return it once it has negotiated QMP.

    QMP keeps no event history, and the real plugin has no test event to
    ping with: jobctl's debug log says when the session is up.
    """
    events = background(disk, "--debug", "events", *args)
    events.wait_stderr("Connected")
    return events


def test_events_json_lines_during_a_mirror(disk, background):
    disk.mirror("--speed", "1M")
    disk.wait_status("running")
    events = attach_events(disk, background, "--json", "--follow")
    disk.ok("set-speed", "disk0", "0")
    seen = []
    while not any(e["event"] == "BLOCK_JOB_READY" for e in seen):
        seen.append(json.loads(events.line()))
    disk.ok("complete", "disk0")
    while seen[-1]["event"] != "JOB_STATUS_CHANGE" or seen[-1]["data"]["status"] != "null":
        seen.append(json.loads(events.line()))
    events.proc.send_signal(signal.SIGINT)
    code, _, _ = events.finish()
    assert code == 0
    for event in seen:
        assert list(event) == ["data", "event", "timestamp"]         # keys sorted
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    names = [e["event"] for e in seen]
    assert names.index("BLOCK_JOB_READY") < names.index("BLOCK_JOB_COMPLETED")
    statuses = [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses == ["ready", "waiting", "pending", "concluded", "null"]
    ready = seen[names.index("BLOCK_JOB_READY")]["data"]
    assert (ready["device"], ready["type"]) == ("disk0", "mirror")
    assert ready["len"] == ready["offset"] > 0


# set-speed, pause, resume, set-policy

def test_set_speed_changes_the_limit_of_a_running_mirror(disk):
    disk.mirror("--speed", "1M")
    assert disk.record()["speed"] == MiB
    disk.ok("set-speed", "disk0", "4M")
    assert disk.record()["speed"] == 4 * MiB
    assert disk.qmp.job("disk0")["speed"] == 4 * MiB
    disk.ok("set-speed", "disk0", "0")
    assert last_line(disk.ok("wait", "disk0", "--until", "ready", "--timeout", "20")) == \
        "job 'disk0' is ready"


def test_pause_shows_paused_and_resume_goes_on(disk):
    disk.mirror("--speed", "1M")
    disk.ok("pause", "disk0")
    record = disk.wait_status("paused")
    assert record["paused"] is True
    row = disk.ok("status").splitlines()[1].split()
    assert row[:4] == ["disk0", "mirror", "disk0", "paused"]
    offset = record["offset"]
    time.sleep(0.3)
    assert disk.record()["offset"] == offset          # a paused mirror copies nothing
    disk.ok("resume", "disk0")
    assert disk.wait_status("running")["paused"] is False
    disk.ok("set-speed", "disk0", "0")
    disk.ok("wait", "disk0", "--until", "ready", "--timeout", "20")


@pytest.fixture
def faulty_target_disk(servers, tmp_path, connect):
    """A Disk whose target fails every write and zero while the file `fault` exists.

    Only writes: a failed block-status query of the target at the mirror's
    start fails the job whatever its policy, so it would hide the policies.
    """
    fault = tmp_path / "fault"
    args = []
    for op in ("pwrite", "zero"):
        args += ["error-%s=EIO" % op, "error-%s-rate=100%%" % op, "error-%s-file=%s" % (op, fault)]
    d = Disk(servers, tmp_path, connect, target_filters=["error"], target_args=args)
    d.fault = fault
    yield d
    d.close()


def test_set_policy_ignore_keeps_a_mirror_going_through_target_errors(
        faulty_target_disk, background):
    disk = faulty_target_disk
    disk.mirror("--speed", "2M")                       # default policy: report
    disk.wait_status("running")
    assert disk.ok("set-policy", "disk0", "--on-target-error", "ignore") == ""
    events = attach_events(disk, background, "--json", "--follow")
    disk.fault.touch()
    error = json.loads(events.line())
    while error["event"] != "BLOCK_JOB_ERROR":
        error = json.loads(events.line())
    # The policy in force is the one set-policy gave, not the default 'report'.
    assert {k: error["data"][k] for k in ("device", "operation", "action")} == {
        "device": "disk0", "operation": "write", "action": "ignore"}
    assert error["data"]["x-errno"] == "EIO"
    time.sleep(0.3)
    record = disk.record()
    assert (record["status"], record["io-status"], record["error"]) == ("running", "ok", None)
    disk.fault.unlink()
    disk.ok("set-speed", "disk0", "0")
    disk.ok("wait", "disk0", "--until", "ready", "--timeout", "20")
    disk.ok("cancel", "disk0", "--wait", "--timeout", "20")
    assert disk.target_bytes() == disk.disk_bytes()


def test_mirror_wait_exits_1_when_the_target_fails_with_policy_report(faulty_target_disk):
    disk = faulty_target_disk
    disk.fault.touch()
    result = disk.run("mirror", "disk0", disk.target.uri, "--wait", "--timeout", "20")
    assert (result.returncode, result.stderr) == (
        1, "jobctl: error: job 'disk0' failed: Input/output error\n")
    assert disk.qmp.execute("query-block-jobs") == []


def test_mirror_stopped_by_its_policy_is_waited_on_and_resume_makes_it_ready(
        faulty_target_disk, background):
    disk = faulty_target_disk
    disk.fault.touch()
    disk.mirror("--on-target-error", "stop")
    record = disk.wait_status("paused")
    assert (record["io-status"], record["error"]) == ("failed", None)
    line = disk.ok("status").splitlines()[1]
    row = line.split()
    assert (row[3], row[7]) == ("paused", "failed")
    assert line.endswith("write EIO: Input/output error")   # why it paused
    waiter = background(disk, "wait", "disk0", "--until", "ready", "--timeout", "20")
    assert waiter.line().startswith("disk0: paused")  # not taken for a failure
    disk.fault.unlink()
    disk.ok("resume", "disk0")
    code, out, err = waiter.finish()
    assert (code, last_line(out)) == (0, "job 'disk0' is ready"), err
    assert disk.record()["io-status"] == "ok"


def test_set_policy_copy_mode_write_blocking_is_in_force(disk):
    disk.mirror("--speed", "1M")
    assert disk.ok("set-policy", "disk0", "--copy-mode", "write-blocking") == ""
    # The plugin does not report policies in queries; that the mode changed
    # shows in the refusal to go back, which only a write-blocking job gives.
    result = disk.run("set-policy", "disk0", "--copy-mode", "background")
    assert (result.returncode, result.stderr) == (
        1, "jobctl: error: Cannot change copy-mode from 'write-blocking' to 'background'\n")
    assert disk.record()["status"] == "running"


def test_set_policy_refuses_an_option_the_job_does_not_have(disk):
    disk.mirror("--speed", "1M")
    result = disk.run("set-policy", "disk0", "--on-error", "ignore")
    assert (result.returncode, result.stderr) == (
        1, "jobctl: error: Job type 'mirror' does not support changing 'on-error'\n")
    assert disk.record()["status"] == "running"


# complete, cancel, wait

def test_complete_wait_pivots_the_disk_to_the_target(disk):
    disk.h.pwrite(b"overlay data" * 100, 5 * MiB + 3)
    disk.mirror("--wait")
    result = disk.run("complete", "disk0", "--wait", "--timeout", "20")
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' completed")
    assert disk.qmp.execute("query-block-jobs") == []
    assert disk.qmp.execute("query-block")[0]["active"] == disk.target.uri
    assert disk.disk_bytes() == disk.target_bytes()
    disk.h.pwrite(b"after pivot", 7 * MiB)            # now lands in the target
    disk.h.flush()
    assert disk.target_bytes()[7 * MiB:7 * MiB + 11] == b"after pivot"


def test_cancel_of_a_ready_mirror_leaves_a_point_in_time_copy(disk):
    disk.mirror("--wait")
    disk.h.pwrite(b"before cancel", MiB)
    snapshot = disk.disk_bytes()
    result = disk.run("cancel", "disk0", "--wait", "--timeout", "20")
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' completed")
    assert disk.target_bytes() == snapshot
    assert disk.qmp.execute("query-block")[0]["active"] is None
    disk.h.pwrite(b"after cancel", MiB)                # the overlay still serves the disk
    assert disk.target_bytes() == snapshot


def test_cancel_force_of_a_ready_mirror_is_cancelled(disk):
    disk.mirror("--wait")
    result = disk.run("cancel", "disk0", "--force", "--wait", "--timeout", "20")
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' was cancelled")
    assert disk.qmp.execute("query-block-jobs") == []
    assert disk.qmp.execute("query-block")[0]["active"] is None


def test_cancel_force_of_a_running_mirror_is_cancelled(disk):
    disk.mirror("--speed", "1M")
    assert disk.ok("cancel", "disk0", "--force") == ""
    disk.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=TIMEOUT, device="disk0")
    assert "BLOCK_JOB_COMPLETED" not in disk.qmp.names()


def test_wait_until_done_sees_the_complete_of_another_jobctl(disk, background):
    disk.mirror("--wait")
    waiter = background(disk, "wait", "disk0", "--until", "done", "--timeout", "20")
    assert waiter.line().startswith("disk0: ready")   # watching before the job can end
    disk.ok("complete", "disk0")
    code, out, err = waiter.finish()
    assert (code, last_line(out)) == (0, "job 'disk0' completed"), err


def test_wait_timeout_exits_4_and_says_how_far_the_job_is(disk):
    disk.mirror("--wait")
    started = time.monotonic()
    result = disk.run("wait", "disk0", "--until", "done", "--timeout", "0.5")
    assert time.monotonic() - started < 10
    assert result.returncode == 4
    assert result.stderr == ("jobctl: error: timed out after 0.5s waiting for job 'disk0' "
                             "to finish (status ready, 100.0% done)\n")
    assert disk.qmp.job("disk0")["status"] == "ready"     # waiting changed nothing


def test_finalize_and_dismiss_a_mirror_kept_by_no_auto_options(disk):
    disk.mirror("--no-auto-finalize", "--no-auto-dismiss", "--wait")
    disk.ok("complete", "disk0")
    disk.wait_status("pending")
    disk.ok("finalize", "disk0")
    record = disk.wait_status("concluded")
    assert record["error"] is None
    assert last_line(disk.ok("wait", "disk0", "--timeout", "10")) == "job 'disk0' completed"
    disk.ok("dismiss", "disk0")
    assert disk.ok("status") == "no jobs\n"
    assert disk.qmp.execute("query-block")[0]["active"] == disk.target.uri


# errors

def test_complete_of_a_mirror_not_yet_ready_is_refused_with_qemu_text(disk):
    disk.mirror("--speed", "1M")
    disk.wait_status("running")
    result = disk.run("complete", "disk0")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == ("jobctl: error: Job 'disk0' in state 'running' cannot accept "
                             "command verb 'complete'\n")
    assert disk.record()["status"] == "running"


@pytest.mark.parametrize("verb", ["pause", "resume", "complete", "cancel"])
def test_verb_on_no_such_job_exits_1(disk, verb):
    result = disk.run(verb, "nope")
    assert (result.returncode, result.stderr) == (1, "jobctl: error: Block job 'nope' not found\n")


def test_wait_for_no_such_job_exits_1(disk):
    result = disk.run("wait", "nope", "--timeout", "10")
    assert (result.returncode, result.stderr) == (1, "jobctl: error: no job 'nope'\n")


def test_mirror_refused_by_the_plugin_exits_1(disk, tmp_path):
    result = disk.run("mirror", "disk0", str(tmp_path / "missing.img"))
    assert result.returncode == 1
    assert result.stderr.startswith("jobctl: error: Could not open ")
    assert disk.qmp.execute("query-block-jobs") == []


def test_server_not_running_exits_3(disk):
    disk.close()
    disk.h.shutdown()
    assert disk.server.stop() == 0
    result = disk.run("status")
    assert result.returncode == 3
    assert result.stderr.startswith(f"jobctl: error: cannot connect to {disk.sock}: "
                                    "server not running")


def test_wait_exits_3_when_nbdkit_goes_away(disk, background):
    disk.mirror("--speed", "1M")
    waiter = background(disk, "wait", "disk0", "--timeout", "20")
    assert waiter.line().startswith("disk0: running")
    disk.close()
    disk.h.shutdown()
    assert disk.server.stop() == 0
    code, _, err = waiter.finish()
    assert code == 3, err
    assert err.startswith("jobctl: error: ") and err.count("\n") == 1


def test_events_follow_exits_3_when_nbdkit_goes_away(disk, background):
    events = attach_events(disk, background, "--follow")
    disk.close()
    disk.h.shutdown()
    assert disk.server.stop() == 0
    code, _, err = events.finish()
    assert code == 3, err
    assert err.splitlines()[-1].startswith("jobctl: error: ")


# stream

def has_block_stream(disk):
    return "block-stream" in {c["name"] for c in json.loads(disk.ok("qmp", "query-commands"))}


def test_stream_wait_copies_the_base_in_and_drops_it(disk):
    if not has_block_stream(disk):
        pytest.skip("the plugin has no block-stream command (plugin/stream.py not committed)")
    disk.h.pwrite(b"overlay data" * 100, 3 * MiB)
    before = disk.disk_bytes()
    assert disk.qmp.execute("query-block")[0]["base"] is not None
    result = disk.run("stream", "disk0", "--wait", "--timeout", "20")
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' completed"), \
        result.stderr
    assert disk.qmp.execute("query-block")[0]["base"] is None
    assert disk.disk_bytes() == before


def test_stream_shows_in_status_and_can_be_cancelled(disk):
    if not has_block_stream(disk):
        pytest.skip("the plugin has no block-stream command (plugin/stream.py not committed)")
    assert disk.ok("stream", "disk0", "--speed", "1M") == "disk0\n"
    record = disk.wait_status("running")
    assert (record["type"], record["speed"], record["ready"]) == ("stream", MiB, False)
    result = disk.run("cancel", "disk0", "--wait", "--timeout", "20")
    assert (result.returncode, last_line(result.stdout)) == (0, "job 'disk0' was cancelled")
    assert disk.qmp.execute("query-block")[0]["base"] is not None


# qmp

def test_qmp_query_block_describes_the_disk(disk):
    [info] = json.loads(disk.ok("qmp", "query-block"))
    assert (info["device"], info["size"], info["base"], info["active"]) == (
        "disk0", SIZE, disk.base, None)
    assert [info] == disk.qmp.execute("query-block")
