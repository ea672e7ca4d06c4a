"""The jobctl executable against a real control server with the real job engine.

Each test starts a small Python program (SERVER_SCRIPT) that runs the
ControlServer with the builtin and job commands, plus two test-only commands:
`x-test-job` starts a simple job (progress in steps, optional ready phase,
optional one-off I/O error handled by its policy) and `x-test-emit` emits an
event. The test then runs the installed `jobctl` as a subprocess.
"""

import json
import os
import pathlib
import select
import subprocess
import sys
import time

import pytest

from helpers import jobctl_path
from jobctl.jobs import JOB_KEYS

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 20

SERVER_SCRIPT = r'''
import errno
import sys

sys.path.insert(0, sys.argv[2])

from plugin.qmp.server import ControlServer
from plugin.qmp.events import EventBus
from plugin.jobs.engine import Job
from plugin.jobs.registry import JobRegistry
from plugin.qmp.job_commands import register_job_commands
from plugin.qmp.dispatch import CommandRegistry, register_builtin_commands


class StepJob(Job):
    """Advances progress in `steps` steps of `delay` seconds; may turn ready;
    may hit one I/O error at `fail_at` (0..1) and apply its policy."""

    soft_cancel_when_ready = True
    changeable_options = frozenset({"copy_mode", "on_source_error", "on_target_error"})

    def __init__(self, job_id, bus, total, steps, delay, ready, fail_at, on_error, **kwargs):
        super().__init__(job_id, "mirror" if ready else "stream", bus, device="disk-" + job_id,
                         **kwargs)
        self.total, self.steps, self.delay = total, steps, delay
        self.ready, self.fail_at, self.on_error = ready, fail_at, on_error

    def run(self):
        self.set_progress(0, self.total)
        chunk = self.total // self.steps
        for step in range(self.steps):
            if self.sleep(self.delay):
                return
            if self.fail_at is not None and step >= self.fail_at * self.steps:
                self.fail_at = None
                action = self.report_io_error("read", errno.EIO, self.on_error)
                if action == "report":
                    raise OSError(errno.EIO, "injected")
                if self.cancelled:
                    return
            self.advance_progress(chunk)
            if self.throttle(chunk):
                return
        if self.ready:
            self.transition_to_ready()
            while not (self.should_complete or self.cancel_requested):
                if self.sleep(0.02):
                    return

    def change(self, **opts):
        pass


def main():
    bus = EventBus()
    registry = CommandRegistry()
    jobs = JobRegistry()
    register_builtin_commands(registry)
    register_job_commands(registry, jobs)

    def start_job(id, total=1 << 20, steps=10, delay=0.05, ready=False, speed=0, paused=False,
                  **options):
        job = StepJob(id, bus, total, steps, delay, ready, options.get("fail-at"),
                      options.get("on-error", "report"), speed=speed,
                      auto_finalize=options.get("auto-finalize", True),
                      auto_dismiss=options.get("auto-dismiss", True))
        jobs.add(job)
        if paused:
            job.user_pause()        # so a test can attach before anything happens
        job.start()

    registry.register("x-test-job", start_job, {
        "id": "str", "*total": "int", "*steps": "int", "*delay": "number", "*ready": "bool",
        "*speed": "int", "*paused": "bool", "*fail-at": "number", "*on-error": "str",
        "*auto-finalize": "bool", "*auto-dismiss": "bool"})
    registry.register("x-test-emit", lambda name, data=None: bus.emit(name, data),
                      {"name": "str", "*data": "dict"})

    # Stand-ins for the real drive-mirror / block-stream (SPEC schemas): they
    # record their arguments and start a StepJob, so jobctl's mapping of
    # options to arguments and its --wait are checked end to end.
    last_args = {}

    def fake_start(command, ready):
        def handler(device, **args):
            last_args[command] = dict(args, device=device)
            start_job(args.get("job-id", device), steps=5, delay=0.02, ready=ready,
                      speed=args.get("speed", 0))
        return handler

    policies = ["report", "ignore", "enospc", "stop", "auto"]
    common = {"device": "str", "*job-id": "str", "*speed": "int",
              "*auto-finalize": "bool", "*auto-dismiss": "bool"}
    registry.register("drive-mirror", fake_start("drive-mirror", True), dict(
        common, **{"target": "str", "sync": ["full", "top", "none"], "*mode": ["existing"],
                   "*granularity": "int", "*buf-size": "int", "*on-source-error": policies,
                   "*on-target-error": policies,
                   "*copy-mode": ["background", "write-blocking"]}))
    registry.register("block-stream", fake_start("block-stream", False),
                      dict(common, **{"*on-error": policies}))
    registry.register("x-test-last-args", lambda command: last_args.get(command),
                      {"command": "str"})

    server = ControlServer(sys.argv[1], registry, bus)
    server.start()
    print("listening", flush=True)
    sys.stdin.read()            # the test closes stdin to stop us
    jobs.stop_all()
    server.stop()


main()
'''


class ControlProcess:
    """The test control server, a child process we started and stop by pid."""

    def __init__(self, tmp_path):
        self.sock = str(tmp_path / "control.sock")
        script = tmp_path / "server.py"
        script.write_text(SERVER_SCRIPT)
        self.log = open(tmp_path / "server.log", "wb")
        self.proc = subprocess.Popen([sys.executable, str(script), self.sock, str(REPO)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, bufsize=0)
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        if not ready or self.proc.stdout.readline() != b"listening\n":
            self.stop()
            pytest.fail("control server did not start: "
                        + (tmp_path / "server.log").read_text(errors="replace"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def server(tmp_path):
    proc = ControlProcess(tmp_path)
    yield proc
    proc.stop()


def jobctl(server, *args, env=None, timeout=TIMEOUT):
    """Run jobctl against `server` and return the CompletedProcess (text)."""
    argv = [jobctl_path()]
    if server is not None:
        argv += ["--socket", server.sock]
    return subprocess.run(argv + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(server, *args):
    """Run jobctl and insist it succeeded; return stdout."""
    result = jobctl(server, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_job(server, job_id="j", **options):
    """Start a StepJob; options are x-test-job arguments with _ for -."""
    arguments = {key.replace("_", "-"): value for key, value in options.items()}
    ok(server, "qmp", "x-test-job", json.dumps(dict(arguments, id=job_id)))


def job_status(server, job_id="j"):
    """The job's record from `status --json`, or None."""
    for record in json.loads(ok(server, "status", "--json"))["jobs"]:
        if record["id"] == job_id:
            return record
    return None


def poll_until(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail("condition not reached in time")


def status_is(server, status, job_id="j"):
    return lambda: (job_status(server, job_id) or {}).get("status") == status


# status

def test_status_without_jobs_says_no_jobs(server):
    assert ok(server, "status") == "no jobs\n"


def test_status_table_shows_a_running_job(server):
    start_job(server, steps=100, delay=0.1)
    lines = ok(server, "status").splitlines()
    assert lines[0].split()[:4] == ["ID", "TYPE", "DEVICE", "STATUS"]
    row = lines[1].split()
    assert row[:4] == ["j", "stream", "j", "running"]
    assert row[4].startswith("[") and row[5].endswith("%")
    assert row[6:] == ["unlimited", "ok", "-"]


def test_status_json_has_the_documented_shape(server):
    start_job(server, total=1 << 20, steps=100, delay=0.1, speed=1 << 30)
    document = json.loads(ok(server, "status", "--json"))
    assert list(document) == ["jobs"]
    record = document["jobs"][0]
    assert tuple(record) == JOB_KEYS
    assert (record["id"], record["type"], record["len"], record["speed"]) == (
        "j", "stream", 1 << 20, 1 << 30)
    assert record["io-status"] == "ok" and record["error"] is None
    assert 0 <= record["progress"] <= 1


def test_status_shows_io_status_of_a_job_stopped_by_its_policy(server):
    start_job(server, fail_at=0.2, on_error="stop", delay=0.01)
    poll_until(status_is(server, "paused"))
    row = ok(server, "status").splitlines()[1]
    assert " paused " in row and " failed " in row


# verbs

def test_pause_then_resume(server):
    start_job(server, steps=200, delay=0.05)
    ok(server, "pause", "j")
    poll_until(status_is(server, "paused"))
    ok(server, "resume", "j")
    poll_until(status_is(server, "running"))


def test_refused_verb_prints_server_text_and_exits_1(server):
    start_job(server, steps=1, delay=0, auto_dismiss=False)
    poll_until(status_is(server, "concluded"))
    result = jobctl(server, "pause", "j")
    assert result.returncode == 1
    assert result.stderr == ("jobctl: error: Job 'j' in state 'concluded' cannot accept "
                             "command verb 'pause'\n")
    assert result.stdout == ""


def test_verb_on_unknown_job_exits_1(server):
    result = jobctl(server, "resume", "nope")
    assert (result.returncode, result.stderr) == (1, "jobctl: error: Block job 'nope' not found\n")


def test_cancel_removes_the_job(server):
    start_job(server, steps=200, delay=0.05)
    ok(server, "cancel", "j")
    poll_until(lambda: job_status(server) is None)


def test_cancel_force_of_a_ready_job_is_cancelled(server, background):
    start_job(server, steps=1, delay=0, ready=True)
    poll_until(status_is(server, "ready"))
    waiter = background(server, "wait", "j")
    assert waiter.line().startswith("j: ready")
    ok(server, "cancel", "--force", "j")
    code, _, err = waiter.finish()
    assert (code, err) == (1, "jobctl: error: job 'j' was cancelled\n")


def test_complete_a_ready_job_then_wait_done(server):
    start_job(server, steps=2, delay=0, ready=True, auto_dismiss=False)
    poll_until(status_is(server, "ready"))
    ok(server, "complete", "j")
    assert ok(server, "wait", "j").splitlines()[-1] == "job 'j' completed"


def test_complete_wait_sees_an_auto_dismissed_job_end(server):
    start_job(server, steps=2, delay=0, ready=True)
    poll_until(status_is(server, "ready"))
    result = jobctl(server, "complete", "j", "--wait")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'j' completed")


def test_cancel_wait_of_a_running_job_succeeds(server):
    start_job(server, steps=200, delay=0.05)
    result = jobctl(server, "cancel", "j", "--wait")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'j' was cancelled")


def test_soft_cancel_wait_of_a_ready_job_completes(server):
    start_job(server, steps=1, delay=0, ready=True)
    poll_until(status_is(server, "ready"))
    result = jobctl(server, "cancel", "j", "--wait")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'j' completed")


def test_set_speed_accepts_size_suffixes(server):
    start_job(server, steps=200, delay=0.05)
    ok(server, "set-speed", "j", "10M")
    assert job_status(server)["speed"] == 10 * 1024 * 1024


def test_set_policy_changes_a_running_job(server):
    start_job(server, steps=200, delay=0.05, ready=True)
    assert ok(server, "set-policy", "j", "--on-target-error", "stop", "--copy-mode",
              "write-blocking") == ""


def test_usage_error_exits_2_without_connecting(tmp_path):
    result = jobctl(None, "--socket", tmp_path / "absent.sock", "set-policy", "j")
    assert result.returncode == 2
    assert result.stderr.startswith("jobctl: error: set-policy: give at least one of")


def test_finalize_and_dismiss_a_manual_job(server):
    start_job(server, steps=1, delay=0, auto_finalize=False, auto_dismiss=False)
    poll_until(status_is(server, "pending"))
    ok(server, "finalize", "j")
    assert job_status(server)["status"] == "concluded"
    ok(server, "dismiss", "j")
    assert job_status(server) is None


# mirror and stream (against stand-ins; the real jobs are tested with nbdkit)

def last_args(server, command):
    return json.loads(ok(server, "qmp", "x-test-last-args", json.dumps({"command": command})))


def test_mirror_prints_the_job_id_named_after_the_device(server):
    assert ok(server, "mirror", "disk0", "nbd://localhost/x") == "disk0\n"
    assert last_args(server, "drive-mirror") == {
        "device": "disk0", "target": "nbd://localhost/x", "mode": "existing", "sync": "full"}


def test_mirror_sends_every_option(server):
    ok(server, "mirror", "disk0", "/tmp/t.img", "--job-id", "m1", "--sync", "top",
       "--speed", "10M", "--granularity", "64K", "--buf-size", "1M", "--on-source-error",
       "stop", "--on-target-error", "enospc", "--copy-mode", "write-blocking",
       "--no-auto-finalize", "--no-auto-dismiss")
    assert last_args(server, "drive-mirror") == {
        "device": "disk0", "target": "/tmp/t.img", "mode": "existing", "sync": "top",
        "job-id": "m1", "speed": 10 << 20, "granularity": 64 << 10, "buf-size": 1 << 20,
        "on-source-error": "stop", "on-target-error": "enospc", "copy-mode": "write-blocking",
        "auto-finalize": False, "auto-dismiss": False}


def test_mirror_wait_returns_once_ready(server):
    result = jobctl(server, "mirror", "disk0", "nbd://localhost/x", "--job-id", "m1", "--wait")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'm1' is ready")
    assert job_status(server, "m1")["status"] == "ready"


def test_stream_wait_returns_once_done(server):
    result = jobctl(server, "stream", "disk0", "--on-error", "ignore", "--wait")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'disk0' completed")
    assert last_args(server, "block-stream") == {"device": "disk0", "on-error": "ignore"}


def test_mirror_refused_by_server_exits_1(server):
    ok(server, "mirror", "disk0", "nbd://localhost/x")
    result = jobctl(server, "mirror", "disk0", "nbd://localhost/x")
    assert (result.returncode, result.stderr) == (
        1, "jobctl: error: Node 'disk-disk0' is busy: block device is in use by block job: mirror\n")


# qmp

def test_qmp_prints_return_value_as_json(server):
    version = json.loads(ok(server, "qmp", "query-version"))
    assert set(version) == {"qemu", "package"}


def test_qmp_passes_arguments(server):
    start_job(server, steps=200, delay=0.05)
    ok(server, "qmp", "block-job-set-speed", '{"device": "j", "speed": 4096}')
    assert job_status(server)["speed"] == 4096


def test_qmp_unknown_command_exits_1_with_server_text(server):
    result = jobctl(server, "qmp", "no-such-command")
    assert (result.returncode, result.stderr) == (
        1, "jobctl: error: The command no-such-command has not been found\n")


def test_qmp_arguments_must_be_a_json_object(server):
    result = jobctl(server, "qmp", "query-version", "[1]")
    assert (result.returncode, result.stderr) == (
        2, "jobctl: error: qmp: JSON-ARGS must be a JSON object\n")


def test_qmp_wrong_argument_type_shows_server_text(server):
    result = jobctl(server, "qmp", "block-job-set-speed", '{"device": "j", "speed": "x"}')
    assert result.returncode == 1
    assert result.stderr == "jobctl: error: Parameter 'speed' expects int\n"


# events

def attach_events(server, background, *args):
    """Start `jobctl events ARGS` and return it once it is surely listening."""
    events = background(server, "events", *args)
    # QMP has no event history: ping until the listener shows it has connected.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ok(server, "qmp", "x-test-emit", '{"name": "TEST_PING"}')
        ready, _, _ = select.select([events.proc.stdout], [], [], 0.2)
        if ready:
            assert "TEST_PING" in events.line()
            return events
    pytest.fail("jobctl events did not start listening")


def test_events_json_prints_one_object_per_line(server, background):
    events = attach_events(server, background, "--json", "--follow")
    start_job(server, steps=1, delay=0)
    seen = []
    while not seen or seen[-1]["data"].get("status") != "null":
        event = json.loads(events.line())
        assert set(event) == {"event", "data", "timestamp"}
        if event["event"] != "TEST_PING":
            seen.append(event)
    names = [e["event"] for e in seen]
    assert "BLOCK_JOB_COMPLETED" in names
    assert [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"] == [
        "created", "running", "waiting", "pending", "concluded", "null"]


def test_events_human_lines_show_name_and_data(server, background):
    events = attach_events(server, background, "--follow")
    ok(server, "qmp", "x-test-emit",
       '{"name": "BLOCK_JOB_ERROR", "data": {"device": "j", "operation": "read", "action": "stop"}}')
    line = events.line()
    while "TEST_PING" in line:
        line = events.line()
    assert line.split(" ", 2)[2] == "BLOCK_JOB_ERROR device=j operation=read action=stop\n"


def test_events_without_follow_exits_after_duration(server):
    started = time.monotonic()
    result = jobctl(server, "events", "--duration", "0.3")
    assert (result.returncode, result.stdout) == (0, "")
    assert time.monotonic() - started < 5


# wait

def test_wait_until_ready_prints_progress_and_summary(server):
    start_job(server, steps=10, delay=0.05, ready=True)
    result = jobctl(server, "wait", "j", "--until", "ready")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "job 'j' is ready"
    assert lines[0].startswith("j: ")


def test_wait_done_for_a_completed_job(server):
    # Kept after concluding, so jobctl finds it however late it starts.
    start_job(server, steps=5, delay=0.02, auto_dismiss=False)
    result = jobctl(server, "wait", "j")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'j' completed")


def test_wait_sees_completion_of_an_auto_dismissed_job(server, background):
    start_job(server, steps=5, delay=0.02, paused=True)
    waiter = background(server, "wait", "j")
    assert waiter.line().startswith("j: ")     # watching before the job can end
    ok(server, "resume", "j")
    code, out, _ = waiter.finish()
    assert (code, out.splitlines()[-1]) == (0, "job 'j' completed")


def test_wait_reports_a_failed_job(server):
    start_job(server, steps=20, delay=0.02, fail_at=0.5, auto_dismiss=False)
    result = jobctl(server, "wait", "j")
    assert result.returncode == 1
    assert result.stderr == "jobctl: error: job 'j' failed: Input/output error\n"


def test_wait_timeout_exits_4(server):
    start_job(server, steps=1000, delay=0.05)
    result = jobctl(server, "wait", "j", "--timeout", "0.5")
    assert result.returncode == 4
    assert result.stderr.startswith("jobctl: error: timed out after 0.5s waiting for job 'j' to finish")


def test_wait_for_unknown_job_exits_1(server):
    result = jobctl(server, "wait", "nope")
    assert (result.returncode, result.stderr) == (1, "jobctl: error: no job 'nope'\n")


# connection

def test_server_not_running_exits_3(tmp_path):
    sock = tmp_path / "absent.sock"
    result = jobctl(None, "--socket", sock, "status")
    assert result.returncode == 3
    assert result.stderr == f"jobctl: error: cannot connect to {sock}: server not running (no such socket)\n"


def test_socket_from_environment(server):
    env = dict(os.environ, JOBCTL_SOCKET=server.sock)
    result = jobctl(None, "status", env=env)
    assert (result.returncode, result.stdout) == (0, "no jobs\n")


def test_socket_option_after_the_command(server):
    result = jobctl(None, "status", "--socket", server.sock)
    assert (result.returncode, result.stdout) == (0, "no jobs\n")
