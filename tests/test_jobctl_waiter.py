"""jobctl's wait logic (JobWaiter, RateMeter) against an in-memory stand-in for the server."""

import io

import pytest

from jobctl.waiter import JobEnded, JobWaiter, PlainDisplay, RateMeter, WaitTimedOut


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeServer:
    """Answers query-block-jobs from a list of snapshots, one per poll.

    Each step is (block_jobs, events): the jobs the poll sees and the events
    delivered after it. The last step repeats. Waiting advances the clock.
    """

    def __init__(self, clock, steps):
        self.clock = clock
        self.steps = steps
        self.polls = 0
        self.pending_events = []

    def execute(self, command, arguments=None):
        if command == "query-jobs":
            return []
        assert command == "query-block-jobs"
        jobs, events = self.steps[min(self.polls, len(self.steps) - 1)]
        self.polls += 1
        self.pending_events.extend(events)
        return jobs

    def next_event(self, timeout=None):
        if self.pending_events:
            return self.pending_events.pop(0)
        self.clock.now += timeout or 0
        return None


def job(status="running", offset=0, ready=False, **extra):
    info = {"device": "j", "type": "mirror", "len": 100, "offset": offset, "status": status,
            "ready": ready, "paused": False, "busy": True, "speed": 0, "io-status": "ok"}
    info.update(extra)
    return info


def event(name, **data):
    return {"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}


def wait(steps, until="done", timeout=None, display=None):
    clock = FakeClock()
    waiter = JobWaiter(FakeServer(clock, steps), "j", until=until, timeout=timeout,
                       display=display, clock=clock)
    return waiter.run()


def test_ready_flag_reaches_until_ready():
    assert wait([([job()], []), ([job("ready", 100, ready=True)], [])], until="ready") == "job 'j' is ready"


def test_ready_event_reaches_until_ready():
    assert wait([([job()], [event("BLOCK_JOB_READY", device="j")])], until="ready") == "job 'j' is ready"


def test_ready_does_not_end_until_done():
    steps = [([job("ready", 100, ready=True)], []),
             ([], [event("BLOCK_JOB_COMPLETED", device="j", type="mirror", len=100, offset=100)])]
    assert wait(steps) == "job 'j' completed"


def test_completed_event_with_error_is_job_ended():
    steps = [([job()], [event("BLOCK_JOB_COMPLETED", device="j", error="Input/output error")])]
    with pytest.raises(JobEnded, match="job 'j' failed: Input/output error"):
        wait(steps)


def test_cancelled_event_is_job_ended():
    with pytest.raises(JobEnded, match="job 'j' was cancelled"):
        wait([([job()], [event("BLOCK_JOB_CANCELLED", device="j")])], until="ready")


def test_events_for_other_jobs_are_ignored():
    steps = [([job()], [event("BLOCK_JOB_CANCELLED", device="other")]), ([job("ready", ready=True)], [])]
    assert wait(steps, until="ready") == "job 'j' is ready"


def test_concluded_job_in_query_reports_its_error():
    with pytest.raises(JobEnded, match="failed: No space left on device"):
        wait([([job("concluded", error="No space left on device")], [])])


def test_concluded_job_without_error_is_completed():
    assert wait([([job("concluded", 100)], [])]) == "job 'j' completed"


def test_unknown_job_is_job_ended_after_grace():
    with pytest.raises(JobEnded, match="no job 'j'"):
        wait([([], [])])


def test_job_vanishing_without_event_is_job_ended():
    with pytest.raises(JobEnded, match="disappeared"):
        wait([([job()], []), ([], [])])


def test_timeout_names_goal_and_progress():
    with pytest.raises(WaitTimedOut, match=r"timed out after 2s .* to become ready \(status running, 40.0% done\)"):
        wait([([job(offset=40)], [])], until="ready", timeout=2)


def test_paused_job_keeps_waiting():
    steps = [([job("paused", **{"io-status": "failed"})], []), ([job("paused")], []),
             ([job("ready", ready=True)], [])]
    assert wait(steps, until="ready") == "job 'j' is ready"


def test_plain_display_prints_status_changes():
    out = io.StringIO()
    steps = [([job(offset=10)], []), ([job("paused", offset=10)], []), ([job("ready", 100, ready=True)], [])]
    wait(steps, until="ready", display=PlainDisplay(out, interval=1000))
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["running", "paused", "ready"]


def test_plain_display_shows_job_errors_as_notes():
    out = io.StringIO()
    steps = [([job()], [event("BLOCK_JOB_ERROR", device="j", operation="read", action="stop")]),
             ([job("ready", ready=True)], [])]
    wait(steps, until="ready", display=PlainDisplay(out))
    assert "BLOCK_JOB_ERROR device=j operation=read action=stop" in out.getvalue()


def test_rate_meter_measures_bytes_per_second():
    meter = RateMeter(window=10)
    meter.add(0.0, 0)
    meter.add(2.0, 200)
    assert meter.rate() == 100
    assert meter.eta(500) == 5


def test_rate_meter_unknown_until_enough_history():
    meter = RateMeter()
    meter.add(0.0, 0)
    assert meter.rate() is None
    assert meter.eta(100) is None


def test_rate_meter_restarts_when_progress_goes_backwards():
    meter = RateMeter()
    meter.add(0.0, 100)
    meter.add(1.0, 50)
    assert meter.rate() is None


def test_query_error_operation_canceled_means_cancelled():
    with pytest.raises(JobEnded, match="job 'j' was cancelled"):
        wait([([job("concluded", error="Operation canceled")], [])])


def test_cancel_ok_turns_cancellation_into_success():
    clock = FakeClock()
    steps = [([job()], [event("BLOCK_JOB_CANCELLED", device="j")])]
    waiter = JobWaiter(FakeServer(clock, steps), "j", cancel_ok=True, clock=clock)
    assert waiter.run() == "job 'j' was cancelled"


class RecordingDisplay:
    """Keeps what the waiter would show: (status, rate, eta) per poll."""

    def __init__(self):
        self.shown = []

    def update(self, record, rate, eta):
        self.shown.append((record["status"], rate, eta))

    def note(self, text):
        pass

    def finish(self):
        pass


def test_paused_job_shows_no_rate_or_eta_and_is_measured_afresh_after_resume():
    display = RecordingDisplay()
    steps = [([job(offset=0)], []), ([job(offset=10)], []),
             ([job("paused", offset=20, paused=True)], []), ([job("paused", offset=20, paused=True)], []),
             ([job(offset=20)], []), ([job(offset=30)], []),
             ([job("ready", 100, ready=True)], [])]
    wait(steps, until="ready", display=display)
    # Polls are 0.5 s apart: 10 bytes per poll is 20 B/s, 40 bytes to go at 20 B/s.
    assert display.shown[:6] == [("running", None, None), ("running", 20.0, 4.5),
                                 ("paused", None, None), ("paused", None, None),
                                 ("running", None, None), ("running", 20.0, 3.5)]


def test_rate_counts_copied_bytes_when_the_server_reports_them():
    display = RecordingDisplay()
    # The offset jumps over a zero range (50 bytes) while only 5 bytes are copied.
    steps = [([job(offset=0, **{"x-copied-bytes": 0})], []),
             ([job(offset=50, **{"x-copied-bytes": 5})], []),
             ([job("ready", 100, ready=True)], [])]
    wait(steps, until="ready", display=display)
    assert display.shown[1] == ("running", 10.0, 0.5)     # rate of copying; ETA by offset


def test_rate_is_offset_progress_without_copied_bytes():
    display = RecordingDisplay()
    steps = [([job(offset=0)], []), ([job(offset=50)], []), ([job("ready", 100, ready=True)], [])]
    wait(steps, until="ready", display=display)
    assert display.shown[1] == ("running", 100.0, 0.5)


def test_terminal_display_fits_its_columns():
    from jobctl.waiter import TerminalDisplay
    out = io.StringIO()
    display = TerminalDisplay(out, columns=lambda: 60)
    steps = [([job(offset=40, len=1 << 30, speed=1 << 20)], []), ([job("ready", 1 << 30, ready=True)], [])]
    wait(steps, until="ready", display=display)
    drawn = [part for part in out.getvalue().split("\r") if part.strip()]
    assert drawn and all(len(part.rstrip("\n")) <= 59 for part in drawn)
