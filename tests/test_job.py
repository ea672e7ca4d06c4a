"""The job engine: lifecycle paths, exact event order, verbs, errors, speed, registry.

Jobs here are a tiny real subclass of plugin.jobs.engine.Job (ScriptedJob) that
"copies" a number of chunks, with scripted I/O faults, an optional ready
phase and gates the test opens to let it proceed.
"""

import errno
import os
import threading
import time

import pytest

from helpers import step_clock
from plugin.qmp.events import EventBus
from plugin.jobs.clock import ManualClock
from plugin.qmp.job_info import block_job_info, job_info
from plugin.jobs.engine import Job
from plugin.jobs.ratelimit import SLICE
from plugin.jobs.registry import JobRegistry
from plugin.core.errors import CommandError

TIMEOUT = 5.0


class ScriptedJob(Job):
    """A job copying ``chunks`` chunks, then optionally staying ready.

    faults: {chunk index: [errno, ...]} -- successive attempts at that chunk
    fail with these errnos (then succeed).  ready_faults: errnos reported
    once per loop while ready.  ``started_gate`` holds the job before its
    first chunk; ``ready_gate`` keeps it ready even after complete/cancel.
    """

    def __init__(self, job_id, bus, *, chunks=4, chunk_size=64 * 1024, becomes_ready=False,
                 faults=None, ready_faults=None, on_error="report", operation="write",
                 hold=False, fail_run=None, fail_prepare=False, **kwargs):
        super().__init__(job_id, "mirror" if becomes_ready else "stream", bus, **kwargs)
        self.chunks = chunks
        self.chunk_size = chunk_size
        self.becomes_ready = becomes_ready
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.ready_faults = list(ready_faults or [])
        self.on_error = on_error
        self.operation = operation
        self.fail_run = fail_run
        self.fail_prepare = fail_prepare
        self.started_gate = threading.Event()
        self.ready_gate = threading.Event()
        self.ready_gate.set()
        if not hold:
            self.started_gate.set()
        self.actions = []
        self.hooks = []
        self.hook_threads = []
        self.pivoted = None
        self.changes = []

    def run(self):
        self.set_progress(0, self.chunks * self.chunk_size)
        while not self.started_gate.is_set():
            if self.sleep(0.005):
                return
        index = 0
        while index < self.chunks:
            if self.pause_point():
                return
            pending = self.faults.get(index)
            if pending:
                err = pending.pop(0)
                action = self.report_io_error(self.operation, err, self.on_error)
                self.actions.append(action)
                if action == "report":
                    raise OSError(err, os.strerror(err))
                if action == "ignore" and self.sleep(0.001):
                    return
                continue    # retry the same chunk (after resume for "stop")
            self.advance_progress(self.chunk_size)
            if self.throttle(self.chunk_size):
                return
            index += 1
        if self.fail_run is not None:
            raise OSError(self.fail_run, os.strerror(self.fail_run))
        if self.becomes_ready:
            self.transition_to_ready()
            while not ((self.should_complete or self.cancel_requested)
                       and self.ready_gate.is_set()):
                if self.ready_faults:
                    err = self.ready_faults.pop(0)
                    self.actions.append(self.report_io_error(self.operation, err,
                                                             self.on_error))
                if self.sleep(0.005):
                    return

    def _hook(self, name):
        self.hooks.append(name)
        self.hook_threads.append(threading.current_thread().name)

    def prepare(self):
        self._hook("prepare")
        if self.fail_prepare:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.pivoted = self.should_complete

    def commit(self):
        self._hook("commit")

    def abort(self):
        self._hook("abort")

    def clean(self):
        self._hook("clean")


class SoftCancelJob(ScriptedJob):
    soft_cancel_when_ready = True


class ChangeableJob(ScriptedJob):
    changeable_options = frozenset({"copy_mode", "on_target_error"})

    def change(self, **opts):
        self.changes.append(opts)


class Events:
    """Collects the events of one bus subscription."""

    def __init__(self, bus):
        self.sub = bus.subscribe(maxlen=100000)

    def until(self, name, timeout=TIMEOUT, **data):
        """Events up to and including the first ``name`` whose data contains ``data``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.sub.get(max(0.0, deadline - time.monotonic()))
            assert event is not None, f"timed out waiting for {name} {data}; saw {summary(seen)}"
            seen.append(event)
            if event["event"] == name and all(event["data"].get(k) == v for k, v in data.items()):
                return seen

    def until_status(self, status, timeout=TIMEOUT):
        return self.until("JOB_STATUS_CHANGE", timeout, status=status)

    def rest(self):
        return self.sub.drain()


def summary(events):
    """Events as short strings: "JOB_STATUS_CHANGE" is shown as its status."""
    return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"]
            for e in events]


@pytest.fixture
def bus():
    return EventBus()


@pytest.fixture
def events(bus):
    return Events(bus)


@pytest.fixture
def registry():
    jobs = JobRegistry()
    yield jobs
    assert jobs.stop_all(timeout=TIMEOUT)


@pytest.fixture
def start(bus, registry):
    """start(job_cls=ScriptedJob, job_id="j0", **kwargs) -> a registered, started job."""

    def _start(cls=ScriptedJob, job_id="j0", **kwargs):
        job = cls(job_id, bus, **kwargs)
        registry.add(job)
        job.start()
        return job

    return _start


@pytest.fixture
def clock():
    """A clock the test steps (helpers.step_clock): rates and intervals checked exactly."""
    return ManualClock()


STEP = 0.01


def wait_for(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


# ----------------------------------------------------------------------
# Successful completion


def test_success_with_auto_finalize_and_dismiss_emits_qemu_event_order(start, events):
    start()
    assert summary(events.until_status("null")) == [
        "created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED",
        "concluded", "null"]


def test_successful_mirror_event_order_is_exactly_qemus(start, events):
    job = start(becomes_ready=True)
    trail = events.until("BLOCK_JOB_READY")
    job.user_complete()
    trail += events.until_status("null")
    assert summary(trail) == [
        "created", "running", "ready", "BLOCK_JOB_READY", "waiting", "pending",
        "BLOCK_JOB_COMPLETED", "concluded", "null"]


def test_success_calls_prepare_commit_clean_in_the_job_thread(start, events):
    job = start(becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_complete()
    events.until_status("null")
    assert job.hooks == ["prepare", "commit", "clean"]
    assert set(job.hook_threads) == {"job-j0"}
    assert job.pivoted is True


def test_completed_event_carries_type_device_len_offset_speed(start, events):
    start(chunks=3, chunk_size=4096, speed=10 ** 9)
    completed = events.until("BLOCK_JOB_COMPLETED")[-1]
    assert completed["data"] == {"type": "stream", "device": "j0", "len": 12288,
                                 "offset": 12288, "speed": 10 ** 9}


def test_ready_event_carries_type_device_len_offset_speed(start, events):
    start(becomes_ready=True, chunks=2, chunk_size=512)
    ready = events.until("BLOCK_JOB_READY")[-1]
    assert ready["data"] == {"type": "mirror", "device": "j0", "len": 1024,
                             "offset": 1024, "speed": 0}


def test_manual_finalize_waits_in_pending_after_block_job_pending(start, events):
    job = start(auto_finalize=False)
    trail = events.until("BLOCK_JOB_PENDING")
    assert summary(trail) == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING"]
    assert trail[-1]["data"] == {"type": "stream", "id": "j0"}
    assert job.status == "pending"
    assert job.hooks == []


def test_finalize_verb_runs_prepare_and_commit_and_concludes(start, events):
    job = start(auto_finalize=False)
    events.until("BLOCK_JOB_PENDING")
    job.user_finalize()
    assert summary(events.until_status("null")) == ["BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert job.hooks == ["prepare", "commit", "clean"]


def test_manual_dismiss_keeps_concluded_job_until_dismissed(start, events, registry):
    job = start(auto_dismiss=False)
    events.until_status("concluded")
    assert registry.get("j0") is job
    assert job.status == "concluded"
    job.user_dismiss()
    assert summary(events.until_status("null")) == ["null"]
    assert registry.get("j0") is None


def test_manual_finalize_and_dismiss_together(start, events):
    job = start(auto_finalize=False, auto_dismiss=False)
    events.until("BLOCK_JOB_PENDING")
    job.user_finalize()
    assert job.status == "concluded"
    job.user_dismiss()
    assert job.status == "null"


# ----------------------------------------------------------------------
# Pause and resume


def test_pause_moves_running_job_to_paused_and_resume_back(start, events):
    job = start(hold=True)
    events.until_status("running")
    job.user_pause()
    assert summary(events.until_status("paused")) == ["paused"]
    assert block_job_info(job)["paused"] is True
    job.user_resume()
    assert summary(events.until_status("running")) == ["running"]
    job.started_gate.set()
    events.until_status("null")


def test_paused_job_makes_no_progress_until_resumed(start, events):
    job = start(hold=True, chunks=2)
    job.user_pause()
    events.until_status("paused")
    job.started_gate.set()
    time.sleep(0.1)
    assert job.progress[0] == 0
    job.user_resume()
    events.until("BLOCK_JOB_COMPLETED")


def test_paused_job_is_not_busy(start, events):
    job = start(hold=True)
    job.user_pause()
    events.until_status("paused")
    assert block_job_info(job)["busy"] is False


def test_pause_of_ready_job_moves_to_standby_and_resume_back_to_ready(start, events):
    job = start(becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_pause()
    assert summary(events.until_status("standby")) == ["standby"]
    assert block_job_info(job)["ready"] is True
    job.user_resume()
    assert summary(events.until_status("ready")) == ["ready"]


def test_pause_before_start_pauses_at_the_first_pause_point(bus, registry, events):
    job = ScriptedJob("j0", bus)
    registry.add(job)
    job.user_pause()
    job.start()
    assert summary(events.until_status("paused")) == ["created", "running", "paused"]
    job.user_resume()
    events.until_status("null")


def test_complete_in_standby_takes_effect_after_resume(start, events):
    job = start(becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_pause()
    events.until_status("standby")
    job.user_complete()
    job.user_resume()
    assert summary(events.until_status("null")) == [
        "ready", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]


# ----------------------------------------------------------------------
# Cancel


def test_cancel_before_ready_emits_cancelled_and_aborts(start, events):
    job = start(hold=True)
    events.until_status("running")
    job.user_cancel()
    assert summary(events.until_status("null")) == [
        "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]


def test_cancelled_event_carries_type_device_len_offset_speed(start, events):
    job = start(hold=True, chunks=2, chunk_size=100, speed=5000)
    wait_for(lambda: job.progress[1] == 200)
    job.user_cancel()
    cancelled = events.until("BLOCK_JOB_CANCELLED")[-1]
    assert cancelled["data"] == {"type": "stream", "device": "j0", "len": 200,
                                 "offset": 0, "speed": 5000}


def test_soft_cancel_after_ready_completes_without_pivot(start, events):
    job = start(SoftCancelJob, becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_cancel(force=False)
    trail = events.until_status("null")
    assert summary(trail) == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert "error" not in trail[2]["data"]
    assert job.pivoted is False
    assert job.hooks == ["prepare", "commit", "clean"]


def test_force_cancel_after_ready_emits_cancelled(start, events):
    job = start(SoftCancelJob, becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_cancel(force=True)
    assert summary(events.until_status("null")) == [
        "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert job.pivoted is None


def test_cancel_after_ready_is_forced_for_jobs_without_soft_cancel(start, events):
    job = start(becomes_ready=True)
    events.until("BLOCK_JOB_READY")
    job.user_cancel(force=False)
    assert "BLOCK_JOB_CANCELLED" in summary(events.until_status("null"))


def test_soft_cancel_before_ready_is_a_forced_cancel(start, events):
    job = start(SoftCancelJob, becomes_ready=True, hold=True)
    events.until_status("running")
    job.user_cancel(force=False)
    assert "BLOCK_JOB_CANCELLED" in summary(events.until_status("null"))


def test_cancel_of_paused_job_unpauses_and_cancels(start, events):
    job = start(hold=True)
    job.user_pause()
    events.until_status("paused")
    job.user_cancel(force=True)
    assert summary(events.until_status("null")) == [
        "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def test_cancel_in_created_state_concludes_without_block_job_events(bus, registry, events):
    job = ScriptedJob("j0", bus)
    registry.add(job)
    job.user_cancel()
    assert summary(events.until_status("null")) == ["created", "aborting", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]
    assert registry.get("j0") is None


def test_cancel_of_pending_job_aborts_it(start, events):
    job = start(auto_finalize=False)
    events.until("BLOCK_JOB_PENDING")
    job.user_cancel()
    assert summary(events.until_status("null")) == [
        "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]


def test_cancelled_concluded_job_shows_operation_canceled(start, events):
    job = start(hold=True, auto_dismiss=False)
    job.user_cancel()
    events.until_status("concluded")
    # QEMU reports -ECANCELED's strerror as the error of a cancelled job.
    assert block_job_info(job)["error"] == "Operation canceled"


# ----------------------------------------------------------------------
# Errors from run() and prepare()


def test_run_error_ends_with_completed_carrying_strerror(start, events):
    job = start(fail_run=errno.EIO)
    trail = events.until_status("null")
    assert summary(trail) == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED",
                              "concluded", "null"]
    assert trail[3]["data"]["error"] == "Input/output error"
    assert job.hooks == ["abort", "clean"]


def test_failed_job_info_shows_error(start, events):
    job = start(fail_run=errno.ENOSPC, auto_dismiss=False)
    events.until_status("concluded")
    assert block_job_info(job)["error"] == "No space left on device"
    assert job_info(job)["error"] == "No space left on device"


def test_prepare_failure_turns_success_into_error(start, events):
    job = start(fail_prepare=True)
    trail = events.until_status("null")
    assert summary(trail) == ["created", "running", "waiting", "pending", "aborting",
                              "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert trail[5]["data"]["error"] == "Input/output error"
    assert job.hooks == ["prepare", "abort", "clean"]


# ----------------------------------------------------------------------
# I/O errors and the policy


def test_report_policy_emits_error_then_ends_job_with_error(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="report")
    trail = events.until_status("null")
    assert summary(trail) == ["created", "running", "BLOCK_JOB_ERROR", "aborting",
                              "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert trail[2]["data"] == {"device": "j0", "operation": "write", "action": "report",
                                "x-errno": "EIO", "x-desc": "Input/output error"}
    assert trail[4]["data"]["error"] == "Input/output error"
    assert job.actions == ["report"]


def test_error_event_names_read_operation(start, events):
    start(faults={0: [errno.EIO]}, on_error="report", operation="read")
    error = events.until("BLOCK_JOB_ERROR")[-1]
    assert error["data"]["operation"] == "read"


def test_ignore_policy_retries_and_completes_without_error(start, events):
    job = start(faults={1: [errno.EIO, errno.EIO]}, on_error="ignore")
    trail = events.until_status("null")
    completed = [e for e in trail if e["event"] == "BLOCK_JOB_COMPLETED"][0]
    assert "error" not in completed["data"]
    assert job.actions == ["ignore", "ignore"]
    assert block_job_info(job)["io-status"] == "ok"


@pytest.mark.parametrize("step, sent", [(0.001, 1), (0.125, 5)])
def test_repeated_ignored_errors_are_rate_limited_but_the_first_is_emitted(
        start, events, clock, step, sent):
    # 40 failures `step` apart on the job's clock: 40 ms, one event; 5 s, one a second
    # (at 0, 1, 2, 3 and 4 s: the steps are exact in binary).
    job = start(faults={1: [errno.EIO] * 40}, on_error="ignore", clock=clock)
    while not job.join(0):
        step_clock(clock, job, step)
    trail = events.until_status("null")
    errors = [e for e in trail if e["event"] == "BLOCK_JOB_ERROR"]
    assert len(job.actions) == 40
    assert len(errors) == sent
    assert errors[0]["data"] == {"device": "j0", "operation": "write", "action": "ignore",
                                 "x-errno": "EIO", "x-desc": "Input/output error"}


def test_stop_policy_pauses_job_and_sets_io_status_failed(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="stop")
    trail = events.until_status("paused")
    assert summary(trail) == ["created", "running", "BLOCK_JOB_ERROR", "paused"]
    assert trail[2]["data"]["action"] == "stop"
    info = block_job_info(job)
    assert (info["io-status"], info["paused"], info["status"]) == ("failed", True, "paused")
    assert job.user_paused is True


def test_a_paused_job_keeps_its_last_error_in_block_info(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="stop")
    events.until_status("paused")
    last = block_job_info(job)["x-last-error"]
    assert {k: last[k] for k in ("operation", "errno", "desc", "count")} == {
        "operation": "write", "errno": "EIO", "desc": "Input/output error", "count": 1}
    assert set(last["time"]) == {"seconds", "microseconds"}
    job.user_resume()                 # resume clears io-status, not the record of why
    assert block_job_info(job)["x-last-error"]["errno"] == "EIO"


def test_repeated_identical_errors_are_counted_in_the_last_error(start, events):
    job = start(faults={1: [errno.EIO] * 5}, on_error="ignore", auto_dismiss=False)
    events.until_status("concluded")
    assert block_job_info(job)["x-last-error"]["count"] == 5


def test_error_counts_add_up_every_error_by_operation_and_errno(start, events):
    job = start(faults={1: [errno.EIO, errno.EIO, errno.ENOSPC, errno.EIO]},
                on_error="ignore", auto_dismiss=False)
    events.until_status("concluded")
    info = block_job_info(job)
    assert info["x-error-counts"] == [{"operation": "write", "errno": "EIO", "count": 3},
                                      {"operation": "write", "errno": "ENOSPC", "count": 1}]
    assert info["x-last-error"]["count"] == 1      # the last streak only: one EIO after ENOSPC


def test_a_job_without_errors_has_no_last_error(start, events):
    job = start(auto_dismiss=False)
    events.until_status("concluded")
    assert "x-last-error" not in block_job_info(job)


def test_enospc_policy_stops_on_enospc_with_io_status_nospace(start, events):
    job = start(faults={1: [errno.ENOSPC]}, on_error="enospc")
    events.until_status("paused")
    assert job.io_status == "nospace"


def test_enospc_policy_reports_other_errors(start, events):
    start(faults={1: [errno.EIO]}, on_error="enospc")
    completed = events.until("BLOCK_JOB_COMPLETED")[-1]
    assert completed["data"]["error"] == "Input/output error"


def test_auto_policy_behaves_as_enospc(start, events):
    job = start(faults={1: [errno.ENOSPC]}, on_error="auto")
    events.until_status("paused")
    assert job.io_status == "nospace"


def test_first_error_wins_io_status_while_stopped(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="stop")
    events.until_status("paused")
    # A second error, reported from another thread (e.g. an I/O worker).
    assert job.report_io_error("write", errno.ENOSPC, "stop") == "stop"
    assert job.io_status == "failed"


def test_resume_after_stop_resets_io_status_and_retries(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="stop", auto_dismiss=False)
    events.until_status("paused")
    job.user_resume()
    assert job.io_status == "ok"
    trail = events.until_status("concluded")
    assert summary(trail) == ["running", "waiting", "pending", "BLOCK_JOB_COMPLETED",
                              "concluded"]
    assert "error" not in trail[3]["data"]
    assert job.progress == (4 * 64 * 1024, 4 * 64 * 1024)


def test_stop_while_ready_moves_to_standby(start, events):
    job = start(becomes_ready=True, ready_faults=[errno.EIO], on_error="stop")
    trail = events.until_status("standby")
    assert summary(trail)[-3:] == ["BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "standby"]
    assert block_job_info(job)["ready"] is True
    job.user_resume()
    events.until_status("ready")
    assert job.io_status == "ok"


def test_cancel_resets_io_status_of_stopped_job(start, events):
    job = start(faults={1: [errno.EIO]}, on_error="stop", auto_dismiss=False)
    events.until_status("paused")
    job.user_cancel(force=True)
    events.until_status("concluded")
    assert job.io_status == "ok"


# ----------------------------------------------------------------------
# Speed


def released(t, speed, chunk_size, chunks):
    """Bytes of progress a ScriptedJob at `speed` shows at clock time t: it counts a
    chunk, then pays for it; the limiter lets it run SLICE seconds ahead (ratelimit.py)."""
    done = 1
    while done < chunks and chunk_size * done - speed * SLICE <= speed * t + 1e-6:
        done += 1
    return done * chunk_size


def test_speed_limits_job_rate(start, events, clock):
    # 256 KiB at 512 KiB/s: 0.5 s, less the 0.1 s slice of burst, on the job's clock.
    speed, chunk, chunks = 512 * 1024, 32 * 1024, 8
    job = start(chunks=chunks, chunk_size=chunk, speed=speed, clock=clock)
    step_clock(clock, job, 0)
    begin = clock.now()
    while not job.join(0):
        step_clock(clock, job, STEP)
        t = clock.now() - begin
        offset = job.progress[0]
        assert released(t - STEP, speed, chunk, chunks) <= offset <= released(
            t, speed, chunk, chunks), (t, offset)
    took = clock.now() - begin
    assert 0.4 - 1e-6 <= took <= 0.4 + STEP
    assert summary(events.until("BLOCK_JOB_COMPLETED"))[-1] == "BLOCK_JOB_COMPLETED"


def test_unlimited_job_is_not_throttled(start, events, clock):
    # 64 MiB without a limit never waits for time: the clock never moves here.
    job = start(chunks=64, chunk_size=1024 * 1024, clock=clock)
    events.until("BLOCK_JOB_COMPLETED")
    assert job.progress == (64 << 20, 64 << 20)
    assert clock.waits_begun() == 0


def test_set_speed_zero_lifts_the_limit_of_a_sleeping_job(start, events, clock):
    # At 1 KiB/s these 256 KiB would take minutes; the job sleeps after its first chunk.
    job = start(chunks=4, chunk_size=64 * 1024, speed=1024, clock=clock)
    step_clock(clock, job, 0)
    assert job.progress[0] == 64 * 1024 and clock.sleepers() == 1
    now = clock.now()
    job.user_set_speed(0)
    events.until("BLOCK_JOB_COMPLETED")          # without the clock moving
    assert clock.now() == now and job.progress[0] == 4 * 64 * 1024


def test_set_speed_lower_slows_a_running_job(start, events, clock):
    speed, chunk = 64 * 1024, 64 * 1024
    job = start(chunks=1000, chunk_size=chunk, hold=True, clock=clock)
    step_clock(clock, job, 0)
    job.started_gate.set()
    job.user_set_speed(speed)            # its kick lets the held job see the gate
    step_clock(clock, job, 0)
    begin = clock.now()
    # One chunk at once, the next once it is paid for (0.9 s: the slice runs ahead).
    while clock.now() - begin < 2.0:
        t = clock.now() - begin
        offset = job.progress[0]
        assert released(t - STEP, speed, chunk, 1000) <= offset <= released(
            t, speed, chunk, 1000), (t, offset)
        step_clock(clock, job, STEP)
    assert job.progress[0] == 3 * chunk            # at 0, 0.9 and 1.9 s
    assert block_job_info(job)["speed"] == speed


def test_negative_speed_is_rejected(start):
    job = start(hold=True)
    with pytest.raises(CommandError) as exc:
        job.user_set_speed(-1)
    assert exc.value.desc == "Parameter 'speed' expects a non-negative value"


def test_negative_speed_at_creation_is_rejected(bus):
    with pytest.raises(CommandError):
        ScriptedJob("j0", bus, speed=-5)


# ----------------------------------------------------------------------
# Refused verbs


@pytest.mark.parametrize("verb, call", [
    ("complete", lambda job: job.user_complete()),
    ("finalize", lambda job: job.user_finalize()),
    ("dismiss", lambda job: job.user_dismiss()),
])
def test_verbs_refused_while_running(start, events, verb, call):
    job = start(hold=True)
    events.until_status("running")
    with pytest.raises(CommandError) as exc:
        call(job)
    assert exc.value.desc == f"Job 'j0' in state 'running' cannot accept command verb '{verb}'"
    assert exc.value.cls == "GenericError"


@pytest.mark.parametrize("verb, call", [
    ("pause", lambda job: job.user_pause()),
    ("set-speed", lambda job: job.user_set_speed(1)),
    ("complete", lambda job: job.user_complete()),
    ("dismiss", lambda job: job.user_dismiss()),
    ("change", lambda job: job.user_change()),
])
def test_verbs_refused_while_pending(start, events, verb, call):
    job = start(auto_finalize=False)
    events.until("BLOCK_JOB_PENDING")
    with pytest.raises(CommandError) as exc:
        call(job)
    assert exc.value.desc == f"Job 'j0' in state 'pending' cannot accept command verb '{verb}'"


@pytest.mark.parametrize("verb, call", [
    ("cancel", lambda job: job.user_cancel()),
    ("set-speed", lambda job: job.user_set_speed(1)),
    ("finalize", lambda job: job.user_finalize()),
])
def test_verbs_refused_when_concluded(start, events, verb, call):
    job = start(auto_dismiss=False)
    events.until_status("concluded")
    with pytest.raises(CommandError) as exc:
        call(job)
    assert exc.value.desc == f"Job 'j0' in state 'concluded' cannot accept command verb '{verb}'"


def test_resume_of_concluded_job_is_refused_as_not_paused(start, events):
    job = start(auto_dismiss=False)
    events.until_status("concluded")
    with pytest.raises(CommandError) as exc:
        job.user_resume()
    assert exc.value.desc == "Can't resume a job that was not paused"


def test_pause_twice_is_refused(start):
    job = start(hold=True)
    job.user_pause()
    with pytest.raises(CommandError) as exc:
        job.user_pause()
    assert exc.value.desc == "Job is already paused"


def test_resume_of_unpaused_job_is_refused(start):
    job = start(hold=True)
    with pytest.raises(CommandError) as exc:
        job.user_resume()
    assert exc.value.desc == "Can't resume a job that was not paused"


def test_complete_after_soft_cancel_is_refused(start, events):
    job = start(SoftCancelJob, becomes_ready=True)
    job.ready_gate.clear()
    events.until("BLOCK_JOB_READY")
    job.user_cancel(force=False)
    with pytest.raises(CommandError) as exc:
        job.user_complete()
    assert exc.value.desc == "The active block job 'j0' cannot be completed"
    job.ready_gate.set()


# ----------------------------------------------------------------------
# block-job-change


def test_change_unsupported_by_job_type(start):
    job = start(hold=True)
    with pytest.raises(CommandError) as exc:
        job.user_change(on_error="stop")
    assert exc.value.desc == "Job type does not support change"


def test_change_passes_supported_options_to_the_job(start):
    job = start(ChangeableJob, hold=True)
    job.user_change(copy_mode="write-blocking", on_target_error="stop")
    assert job.changes == [{"copy_mode": "write-blocking", "on_target_error": "stop"}]


def test_change_rejects_option_the_job_type_lacks(start):
    job = start(ChangeableJob, hold=True)
    with pytest.raises(CommandError) as exc:
        job.user_change(on_source_error="stop")
    assert exc.value.desc == "Job type 'stream' does not support changing 'on-source-error'"
    assert job.changes == []


# ----------------------------------------------------------------------
# Queries


def test_block_info_has_qemu_fields(start, events):
    job = start(hold=True, chunks=2, chunk_size=10, speed=100)
    wait_for(lambda: job.progress[1] == 20)
    info = block_job_info(job)
    assert isinstance(info.pop("busy"), bool)   # flips as the held job sleeps and wakes
    assert info == {
        "type": "stream", "device": "j0", "len": 20, "offset": 0,
        "paused": False, "speed": 100, "io-status": "ok", "ready": False,
        "status": "running", "auto-finalize": True, "auto-dismiss": True}


def test_job_info_has_qemu_fields(start, events):
    job = start(hold=True, chunks=2, chunk_size=10)
    events.until_status("running")
    wait_for(lambda: job.progress[1] == 20)
    assert job_info(job) == {"id": "j0", "type": "stream", "status": "running",
                              "current-progress": 0, "total-progress": 20}


# ----------------------------------------------------------------------
# Registry


def test_add_moves_job_to_created(bus, registry, events):
    job = ScriptedJob("j0", bus)
    registry.add(job)
    assert job.status == "created"
    assert summary(events.until_status("created")) == ["created"]
    job.user_cancel()


def test_duplicate_job_id_is_rejected_without_events(bus, registry, events, start):
    start(hold=True)
    events.until_status("running")
    with pytest.raises(CommandError) as exc:
        registry.add(ScriptedJob("j0", bus))
    assert exc.value.desc == "Job ID 'j0' already in use"
    assert events.rest() == []


@pytest.mark.parametrize("bad_id", ["0abc", "", "a b", "-x", "über"])
def test_malformed_job_id_is_rejected(bus, registry, bad_id):
    with pytest.raises(CommandError) as exc:
        registry.add(ScriptedJob(bad_id, bus))
    assert exc.value.desc == f"Invalid job ID '{bad_id}'"


def test_second_job_on_a_busy_device_is_rejected(bus, registry, start):
    start(hold=True, device="disk0", becomes_ready=True)
    with pytest.raises(CommandError) as exc:
        registry.add(ScriptedJob("j1", bus, device="disk0"))
    assert exc.value.desc == "Node 'disk0' is busy: block device is in use by block job: mirror"


def test_device_is_free_again_once_the_job_concluded(bus, registry, events, start):
    start(device="disk0", auto_dismiss=False)
    events.until_status("concluded")
    registry.add(ScriptedJob("j1", bus, device="disk0"))
    assert registry.active_job("disk0").id == "j1"
    registry.get("j1").user_cancel()


def test_jobs_on_different_devices_coexist(registry, start):
    start(job_id="a", hold=True, device="disk0")
    start(job_id="b", hold=True, device="disk1")
    assert [job.id for job in registry.jobs()] == ["b", "a"]


def test_find_unknown_job(registry):
    with pytest.raises(CommandError) as exc:
        registry.find("nope")
    assert (exc.value.cls, exc.value.desc) == ("GenericError", "Job not found")


def test_find_unknown_block_job(registry):
    with pytest.raises(CommandError) as exc:
        registry.find_block_job("nope")
    assert (exc.value.cls, exc.value.desc) == ("DeviceNotActive", "Block job 'nope' not found")


def test_find_returns_the_job(registry, start):
    job = start(hold=True)
    assert registry.find("j0") is job
    assert registry.find_block_job("j0") is job


def test_auto_dismissed_job_leaves_the_registry(registry, start, events):
    start()
    events.until_status("null")
    assert registry.jobs() == []


def test_stop_all_cancels_and_joins_running_jobs_promptly(registry, start, events, clock):
    # Sleeping on a clock that never moves: stop_all waits for no time to pass.
    jobs = [start(job_id=f"j{i}", hold=True, clock=clock) for i in range(3)]
    wait_for(lambda: clock.sleepers() == 3)
    now = clock.now()
    assert registry.stop_all(timeout=TIMEOUT)
    assert clock.now() == now and clock.sleepers() == 0
    assert all(job.join(0) for job in jobs)
    assert all(job.status == "null" for job in jobs)
    assert registry.jobs() == []


def test_stop_all_aborts_a_pending_job(registry, start, events):
    job = start(auto_finalize=False)
    events.until("BLOCK_JOB_PENDING")
    registry.stop_all(timeout=TIMEOUT)
    assert "BLOCK_JOB_CANCELLED" in summary(events.until_status("null"))
    assert job.hooks == ["abort", "clean"]


def test_stop_all_dismisses_a_concluded_job(registry, start, events):
    job = start(auto_dismiss=False)
    events.until_status("concluded")
    registry.stop_all(timeout=TIMEOUT)
    assert job.status == "null"
    assert registry.jobs() == []


def test_stop_all_stops_a_job_stopped_on_error(registry, start, events):
    job = start(faults={0: [errno.EIO]}, on_error="stop")
    events.until_status("paused")
    assert registry.stop_all(timeout=TIMEOUT)
    assert job.status == "null"


# ----------------------------------------------------------------------
# Worker threads of one job


class WorkerJob(Job):
    """run() copies with two worker threads that share the job's helpers."""

    def __init__(self, job_id, bus, **kwargs):
        super().__init__(job_id, "mirror", bus, **kwargs)
        self.done = threading.Event()
        self.worker_errors = []
        self.parked = set()         # workers inside pause_point()
        self._parked_cond = threading.Condition()

    def pause_point(self):
        name = threading.current_thread().name
        if not name.startswith("worker"):
            return super().pause_point()
        with self._parked_cond:
            self.parked.add(name)
            self._parked_cond.notify_all()
        try:
            return super().pause_point()
        finally:
            with self._parked_cond:
                self.parked.discard(name)

    def wait_parked(self, count, timeout=TIMEOUT):
        with self._parked_cond:
            return self._parked_cond.wait_for(lambda: len(self.parked) == count, timeout)

    def _worker(self):
        try:
            while not self.done.is_set():
                if self.pause_point() or self.throttle(1024):
                    return
                self.advance_progress(1024)
                self.sleep(0.001)
        except Exception as exc:    # surfaced by the test
            self.worker_errors.append(exc)

    def run(self):
        workers = [threading.Thread(target=self._worker, name="worker-%d" % i) for i in range(2)]
        for worker in workers:
            worker.start()
        while not self.done.is_set():
            if self.sleep(0.005):
                break
        self.done.set()
        for worker in workers:
            worker.join()


def test_worker_threads_wait_at_pause_points_without_changing_state(start, events):
    job = start(WorkerJob)
    events.until_status("running")
    wait_for(lambda: job.progress[0] > 0)      # the workers are copying
    job.user_pause()
    events.until_status("paused")
    # Each worker finishes the chunk it was copying, then waits in its pause point
    # (progress only moves after one returns).
    assert job.wait_parked(2), job.parked
    offset = job.progress[0]
    assert job.status == "paused" and block_job_info(job)["paused"] is True
    assert job.parked == {"worker-0", "worker-1"} and job.progress[0] == offset
    job.user_resume()
    events.until_status("running")
    wait_for(lambda: job.progress[0] > offset)
    job.done.set()
    assert summary(events.until_status("null")) == [
        "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert job.worker_errors == []


class _Held:
    """Stands for what a job holds (copy buffers, its dirty bitmap)."""


def test_a_finished_jobs_objects_are_collected_soon_after_it_leaves_the_registry(bus, events):
    """A job's objects refer to each other (its callbacks), so they go only with a
    full collection, which a quiet server rarely runs (150 mirrors grew nbdkit
    from 40 to 326 MiB): the registry runs one shortly after a job leaves it.
    Automatic collection is off here, so only that one can free them."""
    import gc
    import weakref
    registry = JobRegistry(reap_delay=0.05)
    gc.disable()
    try:
        job = ScriptedJob("j0", bus, auto_dismiss=False)
        held = _Held()
        job.held, held.job = held, job               # a cycle, as a job's callbacks make
        gone = threading.Event()
        ref = weakref.ref(held, lambda _: gone.set())
        registry.add(job)
        job.start()
        events.until_status("concluded")
        assert job.join(TIMEOUT)                     # its thread refers to it no more
        del job, held
        registry.find("j0").user_dismiss()
        events.until_status("null")
        assert gone.wait(TIMEOUT), "the finished job's objects were not collected"
        assert ref() is None
    finally:
        gc.enable()
        registry.close()
