"""The job QMP commands, driven through CommandRegistry.execute like a client would."""

import errno
import os
import threading
import time

import pytest

from plugin.qmp.events import EventBus
from plugin.jobs.engine import Job
from plugin.jobs.registry import JobRegistry
from plugin.qmp.job_commands import register_job_commands
from plugin.core.errors import CommandError
from plugin.qmp.dispatch import CommandRegistry

TIMEOUT = 5.0


class GatedJob(Job):
    """Copies 4 chunks of 1 KiB once ``go`` is set; becomes ready if asked.

    ``fault`` makes the first chunk fail once with that errno under policy ``on_error``.
    """

    def __init__(self, job_id, bus, *, job_type="stream", becomes_ready=False, fault=None,
                 on_error="report", **kwargs):
        super().__init__(job_id, job_type, bus, **kwargs)
        self.becomes_ready = becomes_ready
        self.fault = fault
        self.on_error = on_error
        self.go = threading.Event()
        self.pivoted = None
        self.changes = []

    def run(self):
        self.set_progress(0, 4096)
        while not self.go.is_set():
            if self.sleep(0.005):
                return
        done = 0
        while done < 4096:
            if self.pause_point():
                return
            if self.fault is not None:
                err, self.fault = self.fault, None
                if self.report_io_error("write", err, self.on_error) == "report":
                    raise OSError(err, os.strerror(err))
                continue
            done += 1024
            self.advance_progress(1024)
            if self.throttle(1024):
                return
        if self.becomes_ready:
            self.transition_to_ready()
            while not (self.should_complete or self.cancel_requested):
                if self.sleep(0.005):
                    return

    def prepare(self):
        self.pivoted = self.should_complete


class SoftCancelJob(GatedJob):
    soft_cancel_when_ready = True


class MirrorLikeJob(GatedJob):
    changeable_options = frozenset({"copy_mode", "on_source_error", "on_target_error"})

    def change(self, **opts):
        self.changes.append(opts)


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def sub(bus):
    return bus.subscribe(maxlen=100000)


@pytest.fixture
def jobs():
    registry = JobRegistry()
    yield registry
    assert registry.stop_all(timeout=TIMEOUT)


@pytest.fixture
def qmp(jobs):
    commands = CommandRegistry()
    register_job_commands(commands, jobs)
    return commands


@pytest.fixture
def start(bus, jobs):
    def _start(cls=GatedJob, job_id="job0", go=False, **kwargs):
        job = cls(job_id, bus, **kwargs)
        jobs.add(job)
        job.start()
        if go:
            job.go.set()
        return job
    return _start


def wait_event(sub, name, timeout=TIMEOUT, **data):
    deadline = time.monotonic() + timeout
    while True:
        event = sub.get(max(0.0, deadline - time.monotonic()))
        assert event is not None, f"timed out waiting for {name} {data}"
        if event["event"] == name and all(event["data"].get(k) == v for k, v in data.items()):
            return event


def wait_status(sub, status):
    return wait_event(sub, "JOB_STATUS_CHANGE", status=status)


def error_of(qmp, name, args):
    with pytest.raises(CommandError) as exc:
        qmp.execute(name, args)
    return exc.value.cls, exc.value.desc


# ----------------------------------------------------------------------
# Registration and schemas


def test_all_job_commands_are_registered(qmp):
    assert set(qmp.names()) == {
        "query-block-jobs", "query-jobs", "block-job-set-speed", "block-job-cancel",
        "block-job-pause", "block-job-resume", "block-job-complete", "block-job-finalize",
        "block-job-dismiss", "block-job-change", "job-pause", "job-resume", "job-cancel",
        "job-complete", "job-finalize", "job-dismiss", "job-change"}


def test_block_job_commands_take_device(qmp):
    assert error_of(qmp, "block-job-pause", {}) == ("GenericError", "Parameter 'device' is missing")


def test_job_commands_take_id(qmp):
    assert error_of(qmp, "job-pause", {"device": "x"}) == ("GenericError", "Parameter 'id' is missing")


def test_set_speed_requires_an_int_speed(qmp):
    assert error_of(qmp, "block-job-set-speed", {"device": "job0", "speed": "fast"}) == (
        "GenericError", "Parameter 'speed' expects int")


def test_block_job_change_rejects_unknown_policy(qmp):
    assert error_of(qmp, "block-job-change", {"id": "job0", "on-error": "retry"}) == (
        "GenericError", "Parameter 'on-error' does not accept value 'retry'")


# ----------------------------------------------------------------------
# Lookups


@pytest.mark.parametrize("name, args", [
    ("block-job-pause", {"device": "nope"}),
    ("block-job-resume", {"device": "nope"}),
    ("block-job-cancel", {"device": "nope"}),
    ("block-job-complete", {"device": "nope"}),
    ("block-job-set-speed", {"device": "nope", "speed": 1}),
    ("block-job-finalize", {"id": "nope"}),
    ("block-job-dismiss", {"id": "nope"}),
    ("block-job-change", {"id": "nope"}),
])
def test_block_job_commands_on_unknown_job_are_device_not_active(qmp, name, args):
    assert error_of(qmp, name, args) == ("DeviceNotActive", "Block job 'nope' not found")


@pytest.mark.parametrize("name", ["job-pause", "job-resume", "job-cancel", "job-complete",
                                  "job-finalize", "job-dismiss"])
def test_job_commands_on_unknown_job_say_job_not_found(qmp, name):
    assert error_of(qmp, name, {"id": "nope"}) == ("GenericError", "Job not found")


# ----------------------------------------------------------------------
# Queries


def test_query_block_jobs_is_empty_without_jobs(qmp):
    assert qmp.execute("query-block-jobs", {}) == []


def test_query_block_jobs_lists_block_job_info(qmp, start):
    job = start(speed=2048)
    (info,) = qmp.execute("query-block-jobs", {})
    assert info["device"] == "job0"
    assert info["type"] == "stream"
    assert info["speed"] == 2048
    assert info["io-status"] == "ok"
    assert info["status"] == "running"
    assert set(info) == {"type", "device", "len", "offset", "busy", "paused", "speed",
                         "io-status", "ready", "status", "auto-finalize", "auto-dismiss"}
    job.go.set()


def test_query_jobs_lists_job_info(qmp, start):
    start()
    (info,) = qmp.execute("query-jobs", {})
    assert set(info) == {"id", "type", "status", "current-progress", "total-progress"}
    assert (info["id"], info["status"]) == ("job0", "running")


def test_query_lists_newest_job_first(qmp, start):
    start(job_id="older")
    start(job_id="newer")
    assert [i["device"] for i in qmp.execute("query-block-jobs", {})] == ["newer", "older"]


# ----------------------------------------------------------------------
# Verbs


def test_block_job_pause_and_resume(qmp, start, sub):
    start()
    assert qmp.execute("block-job-pause", {"device": "job0"}) == {}
    wait_status(sub, "paused")
    assert qmp.execute("query-block-jobs", {})[0]["paused"] is True
    qmp.execute("block-job-resume", {"device": "job0"})
    wait_status(sub, "running")


def test_job_pause_and_resume(qmp, start, sub):
    start()
    qmp.execute("job-pause", {"id": "job0"})
    wait_status(sub, "paused")
    qmp.execute("job-resume", {"id": "job0"})
    wait_status(sub, "running")


def test_block_job_cancel_emits_cancelled(qmp, start, sub):
    start()
    qmp.execute("block-job-cancel", {"device": "job0"})
    assert wait_event(sub, "BLOCK_JOB_CANCELLED")["data"]["device"] == "job0"


def test_block_job_cancel_of_paused_job_needs_force(qmp, start, sub):
    start()
    qmp.execute("block-job-pause", {"device": "job0"})
    assert error_of(qmp, "block-job-cancel", {"device": "job0"}) == (
        "GenericError", "The block job for device 'job0' is currently paused")
    qmp.execute("block-job-cancel", {"device": "job0", "force": True})
    wait_event(sub, "BLOCK_JOB_CANCELLED")


def test_block_job_cancel_after_ready_is_soft_for_soft_cancel_jobs(qmp, start, sub):
    job = start(SoftCancelJob, go=True, becomes_ready=True, job_type="mirror")
    wait_event(sub, "BLOCK_JOB_READY")
    qmp.execute("block-job-cancel", {"device": "job0"})
    completed = wait_event(sub, "BLOCK_JOB_COMPLETED")
    assert "error" not in completed["data"]
    assert job.pivoted is False


def test_job_cancel_always_forces(qmp, start, sub):
    start(SoftCancelJob, go=True, becomes_ready=True, job_type="mirror")
    wait_event(sub, "BLOCK_JOB_READY")
    qmp.execute("job-cancel", {"id": "job0"})
    wait_event(sub, "BLOCK_JOB_CANCELLED")


def test_job_cancel_of_paused_job_is_accepted(qmp, start, sub):
    start()
    qmp.execute("job-pause", {"id": "job0"})
    qmp.execute("job-cancel", {"id": "job0"})
    wait_event(sub, "BLOCK_JOB_CANCELLED")


@pytest.mark.parametrize("name, key", [("block-job-complete", "device"),
                                       ("job-complete", "id")])
def test_complete_pivots_a_ready_job(qmp, start, sub, name, key):
    job = start(go=True, becomes_ready=True, job_type="mirror")
    wait_event(sub, "BLOCK_JOB_READY")
    qmp.execute(name, {key: "job0"})
    completed = wait_event(sub, "BLOCK_JOB_COMPLETED")
    assert completed["data"]["type"] == "mirror"
    assert job.pivoted is True


def test_complete_of_running_job_is_refused_with_qemu_text(qmp, start):
    start()
    assert error_of(qmp, "block-job-complete", {"device": "job0"}) == (
        "GenericError", "Job 'job0' in state 'running' cannot accept command verb 'complete'")


def test_block_job_set_speed_changes_speed(qmp, start):
    start()
    qmp.execute("block-job-set-speed", {"device": "job0", "speed": 123456})
    assert qmp.execute("query-block-jobs", {})[0]["speed"] == 123456


def test_block_job_set_speed_rejects_negative(qmp, start):
    start()
    assert error_of(qmp, "block-job-set-speed", {"device": "job0", "speed": -1}) == (
        "GenericError", "Parameter 'speed' expects a non-negative value")


@pytest.mark.parametrize("prefix, key", [("block-job-", "id"), ("job-", "id")])
def test_finalize_and_dismiss(qmp, start, sub, prefix, key):
    start(go=True, auto_finalize=False, auto_dismiss=False)
    wait_event(sub, "BLOCK_JOB_PENDING")
    qmp.execute(prefix + "finalize", {key: "job0"})
    assert qmp.execute("query-jobs", {})[0]["status"] == "concluded"
    qmp.execute(prefix + "dismiss", {key: "job0"})
    assert qmp.execute("query-jobs", {}) == []


def test_dismiss_of_running_job_is_refused(qmp, start):
    start()
    assert error_of(qmp, "job-dismiss", {"id": "job0"}) == (
        "GenericError", "Job 'job0' in state 'running' cannot accept command verb 'dismiss'")


def test_stopped_job_shows_io_status_and_resume_resets_it(qmp, start, sub):
    start(go=True, fault=errno.ENOSPC, on_error="enospc", auto_dismiss=False)
    error = wait_event(sub, "BLOCK_JOB_ERROR")
    assert error["data"] == {"device": "job0", "operation": "write", "action": "stop",
                             "x-errno": "ENOSPC", "x-desc": "No space left on device"}
    wait_status(sub, "paused")
    info = qmp.execute("query-block-jobs", {})[0]
    assert (info["io-status"], info["paused"], info["status"]) == ("nospace", True, "paused")
    qmp.execute("block-job-resume", {"device": "job0"})
    wait_status(sub, "concluded")
    info = qmp.execute("query-block-jobs", {})[0]
    assert (info["io-status"], info["status"]) == ("ok", "concluded")
    assert "error" not in info


def test_failed_job_shows_error_in_queries(qmp, start, sub):
    start(go=True, fault=errno.EIO, auto_dismiss=False)
    wait_status(sub, "concluded")
    assert qmp.execute("query-block-jobs", {})[0]["error"] == "Input/output error"
    assert qmp.execute("query-jobs", {})[0]["error"] == "Input/output error"


# ----------------------------------------------------------------------
# block-job-change


def test_block_job_change_passes_options_with_underscore_names(qmp, start):
    job = start(MirrorLikeJob, job_type="mirror")
    qmp.execute("block-job-change", {"id": "job0", "copy-mode": "write-blocking",
                                     "on-target-error": "stop"})
    assert job.changes == [{"copy_mode": "write-blocking", "on_target_error": "stop"}]


def test_block_job_change_with_unsupported_option_is_refused(qmp, start):
    job = start(MirrorLikeJob, job_type="mirror")
    assert error_of(qmp, "block-job-change", {"id": "job0", "on-error": "stop"}) == (
        "GenericError", "Job type 'mirror' does not support changing 'on-error'")
    assert job.changes == []


def test_block_job_change_on_job_type_without_change(qmp, start):
    start()
    assert error_of(qmp, "block-job-change", {"id": "job0", "on-error": "stop"}) == (
        "GenericError", "Job type does not support change")


def test_block_job_change_checks_the_optional_type(qmp, start):
    start(MirrorLikeJob, job_type="mirror")
    assert error_of(qmp, "block-job-change", {"id": "job0", "type": "stream"}) == (
        "GenericError", "Job 'job0' is 'mirror' job, not 'stream'")


def test_block_job_change_refused_when_pending(qmp, start, sub):
    start(MirrorLikeJob, job_type="mirror", go=True, auto_finalize=False)
    wait_event(sub, "BLOCK_JOB_PENDING")
    assert error_of(qmp, "block-job-change", {"id": "job0", "copy-mode": "background"}) == (
        "GenericError", "Job 'job0' in state 'pending' cannot accept command verb 'change'")


# ----------------------------------------------------------------------
# job-change (QEMU 9.2's name for block-job-change)


def test_job_change_takes_block_job_changes_arguments(qmp, start):
    job = start(MirrorLikeJob, job_type="mirror")
    qmp.execute("job-change", {"id": "job0", "type": "mirror", "copy-mode": "write-blocking",
                               "on-source-error": "ignore"})
    assert job.changes == [{"copy_mode": "write-blocking", "on_source_error": "ignore"}]
    assert error_of(qmp, "job-change", {"id": "job0", "type": "stream"}) == (
        "GenericError", "Job 'job0' is 'mirror' job, not 'stream'")
    assert error_of(qmp, "job-change", {"id": "job0", "on-error": "stop"}) == (
        "GenericError", "Job type 'mirror' does not support changing 'on-error'")


def test_job_change_looks_the_job_up_as_job_commands_do(qmp):
    assert error_of(qmp, "job-change", {"id": "nope"}) == ("GenericError", "Job not found")
    assert error_of(qmp, "job-change", {"id": "nope", "copy-mode": "sideways"})[0] == \
        "GenericError"
