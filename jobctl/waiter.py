"""Waiting for a job to become ready or to finish, with progress display.

Events say *when* something happened (BLOCK_JOB_READY, BLOCK_JOB_COMPLETED,
BLOCK_JOB_CANCELLED); polling query-block-jobs says *how far* a job is and
catches states reached before we connected.  The waiter uses both: it polls
on a short interval and re-polls as soon as an event about the job arrives.
"""

import collections
import errno
import os
import sys
import time

from . import jobs as joblib
from .render import event_line, is_paused, progress_line, terminal_columns

POLL_INTERVAL = 0.5
# How long a job may be missing from query results before we give up on the
# event that says how it ended (a reply can overtake an event on the wire).
MISSING_GRACE = 1.0
RATE_WINDOW = 5.0
# The error text of a cancelled job in query-jobs (QEMU uses strerror(ECANCELED)).
CANCELLED_ERROR = os.strerror(errno.ECANCELED)


class JobEnded(Exception):
    """The job ended without reaching the goal: failed, cancelled, or gone."""


class WaitTimedOut(Exception):
    """The goal was not reached within the timeout."""


class RateMeter:
    """Bytes per second over a sliding window of (time, bytes done) samples."""

    def __init__(self, window=RATE_WINDOW):
        self.window = window
        self._samples = collections.deque()

    def add(self, now, done):
        if done is None:
            return
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()      # progress went backwards (e.g. re-dirtied)
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window:
            self._samples.popleft()

    def reset(self):
        """Forget the history (a paused job's rate says nothing about its next run)."""
        self._samples.clear()

    def rate(self):
        """Return bytes/s, or None until there is enough history."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 0.5:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining):
        """Seconds until `remaining` bytes are done at the current rate, or None."""
        rate = self.rate()
        if remaining is None or not rate or rate <= 0:
            return None
        return remaining / rate


class TerminalDisplay:
    """Redraws one progress line in place; notes go on lines of their own.

    The line fits in the terminal's width (asked again on every update, so a
    resized window is followed) less one column: a line that fills the last
    column leaves some terminals waiting to wrap.
    """

    def __init__(self, stream, columns=None):
        self.stream = stream
        self.columns = columns or (lambda: terminal_columns(stream) or 80)
        self._width = 0

    def update(self, record, rate, eta):
        line = progress_line(record, rate, eta, bar=True, width=max(1, self.columns() - 1))
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def note(self, text):
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self):
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _clear(self):
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


class PlainDisplay:
    """Prints a progress line when the status changes, else at most every interval."""

    def __init__(self, stream, interval=1.0):
        self.stream = stream
        self.interval = interval
        self._last_time = None
        self._last_key = None
        self._last_progress = None

    def update(self, record, rate, eta):
        now = time.monotonic()
        key = (record["status"], record["io-status"], record["ready"])
        progressed = record["progress"] != self._last_progress
        due = self._last_time is None or now - self._last_time >= self.interval
        if key != self._last_key or (progressed and due):
            self.stream.write(progress_line(record, rate, eta, bar=False) + "\n")
            self.stream.flush()
            self._last_time, self._last_key = now, key
            self._last_progress = record["progress"]

    def note(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self):
        pass


def make_display(stream=None):
    """A bar for a terminal, plain lines for pipes and logs."""
    stream = stream or sys.stdout
    if stream.isatty():
        return TerminalDisplay(stream)
    return PlainDisplay(stream)


class JobWaiter:
    """Waits on one job over an open QMPClient.

    until="ready": return once the job is ready (a mirror in sync), or has
    completed successfully. until="done": return once the job completed.
    cancel_ok: a cancelled job counts as reaching the goal (for `cancel --wait`).
    run() returns a one-line summary; raises JobEnded or WaitTimedOut.
    """

    def __init__(self, client, job_id, until="done", timeout=None, display=None,
                 poll_interval=POLL_INTERVAL, clock=time.monotonic, cancel_ok=False):
        if until not in ("ready", "done"):
            raise ValueError(f"until must be 'ready' or 'done', not {until!r}")
        self.client, self.job_id, self.until = client, job_id, until
        self.timeout, self.poll_interval, self.clock = timeout, poll_interval, clock
        self.display = display
        self.cancel_ok = cancel_ok
        self.meter = RateMeter()        # bytes copied: the rate shown
        self.eta_meter = RateMeter()    # offset: when it reaches len
        self.record = None          # latest query result for the job
        self.seen = False           # the job showed up in a query at least once
        self.ready_seen = False
        self.completed = None       # None, or the BLOCK_JOB_COMPLETED data
        self.cancelled = False
        self.missing_since = None

    def run(self):
        start = self.clock()
        deadline = None if self.timeout is None else start + self.timeout
        try:
            while True:
                self._drain_events(timeout=0)
                self._poll()
                verdict = self._verdict()
                if verdict is not None:
                    return verdict
                now = self.clock()
                if deadline is not None and now >= deadline:
                    raise WaitTimedOut(self._timeout_message())
                wait = self.poll_interval
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._drain_events(timeout=wait, stop_on_job_event=True)
        finally:
            if self.display:
                self.display.finish()

    def _poll(self):
        records = joblib.fetch_jobs(self.client)
        record = joblib.find_job(records, self.job_id)
        now = self.clock()
        if record is None:
            if self.missing_since is None:
                self.missing_since = now
            return
        self.missing_since = None
        self.seen = True
        self.record = record
        done, total = joblib.done_and_total(record)
        if is_paused(record):
            # No progress to measure, no ETA; start afresh once it runs again.
            self.meter.reset()
            self.eta_meter.reset()
            rate = eta = None
        else:
            copied = record.get("x-copied-bytes")
            self.meter.add(now, done if copied is None else copied)
            self.eta_meter.add(now, done)
            remaining = None if total is None else total - done
            rate, eta = self.meter.rate(), self.eta_meter.eta(remaining)
        if self.display:
            self.display.update(record, rate, eta)

    def _drain_events(self, timeout, stop_on_job_event=False):
        """Consume events for up to `timeout` seconds; return early on one about our job."""
        deadline = self.clock() + timeout
        while True:
            remaining = max(0.0, deadline - self.clock())
            event = self.client.next_event(timeout=remaining)
            if event is None:
                return
            if joblib.event_job_id(event.get("data")) != self.job_id:
                continue
            self._on_event(event)
            if stop_on_job_event:
                # Give the poll a moment's worth of events, then re-poll now.
                self._drain_events(timeout=0)
                return

    def _on_event(self, event):
        name, data = event.get("event"), event.get("data") or {}
        if name == "BLOCK_JOB_READY":
            self.ready_seen = True
        elif name == "BLOCK_JOB_COMPLETED":
            self.completed = data
        elif name == "BLOCK_JOB_CANCELLED":
            self.cancelled = True
        elif name == "JOB_STATUS_CHANGE" and data.get("status") == "ready":
            self.ready_seen = True
        elif name in ("BLOCK_JOB_ERROR", "BLOCK_IO_ERROR") and self.display:
            self.display.note(event_line(event))

    def _verdict(self):
        """Return a success summary, raise if the job cannot reach the goal, else None."""
        job = f"job '{self.job_id}'"
        if self.cancelled:
            return self._cancelled()
        if self.completed is not None:
            error = self.completed.get("error")
            if error:
                raise JobEnded(f"{job} failed: {error}")
            return f"{job} completed"
        record = self.record
        if self.until == "ready" and (self.ready_seen or (record and self._is_ready(record))):
            return f"{job} is ready"
        if record is not None and self.missing_since is None:
            if record["status"] in joblib.FINAL_STATES:
                # Concluded before we were watching: the query says how it ended.
                if record["error"] == CANCELLED_ERROR:
                    return self._cancelled()
                if record["error"]:
                    raise JobEnded(f"{job} failed: {record['error']}")
                return f"{job} completed"
            return None
        if self.missing_since is not None and self.clock() - self.missing_since >= MISSING_GRACE:
            if not self.seen:
                raise JobEnded(f"no job '{self.job_id}'")
            raise JobEnded(f"{job} disappeared without reporting how it ended")
        return None

    def _cancelled(self):
        message = f"job '{self.job_id}' was cancelled"
        if self.cancel_ok:
            return message
        raise JobEnded(message)

    @staticmethod
    def _is_ready(record):
        return bool(record["ready"]) or record["status"] in ("ready", "standby")

    def _timeout_message(self):
        goal = "become ready" if self.until == "ready" else "finish"
        state = ""
        if self.record is not None:
            percent = self.record["progress"]
            state = f" (status {self.record['status']}"
            if percent is not None:
                state += f", {percent * 100:.1f}% done"
            state += ")"
        return f"timed out after {self.timeout:g}s waiting for job '{self.job_id}' to {goal}{state}"
