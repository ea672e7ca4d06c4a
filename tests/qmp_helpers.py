"""Helpers for tests that steer the plugin over its control socket."""

import time

from jobctl.qmp_client import QMPClient


class Control:
    """A negotiated QMP session that records every event it sees."""

    def __init__(self, path):
        self.client = QMPClient(str(path), timeout=30)
        self.client.connect()
        self.events = []

    def __call__(self, command, **args):
        return self.client.execute(command, {k.replace("_", "-"): v for k, v in args.items()})

    def execute(self, command, args=None):
        return self.client.execute(command, args or {})

    def _next(self, timeout):
        event = self.client.next_event(timeout)
        if event is not None:
            self.events.append(event)
        return event

    def wait_event(self, name, timeout=60, **match):
        """Wait for an event named `name` whose data contains `match`; returns it."""
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        for e in self.events[self._cursor():]:
            if e["event"] == name and all(e["data"].get(k) == v for k, v in match.items()):
                self._mark(e)
                return e
        while time.monotonic() < deadline:
            e = self._next(max(0.01, deadline - time.monotonic()))
            if e is None:
                continue
            if e["event"] == name and all(e["data"].get(k) == v for k, v in match.items()):
                self._mark(e)
                return e
        raise AssertionError("no %s %r within %ss; events: %s"
                             % (name, match, timeout, self.names()[seen - 5:]))

    def _cursor(self):
        return getattr(self, "_pos", 0)

    def _mark(self, event):
        self._pos = self.events.index(event) + 1

    def wait_status(self, job, status, timeout=60):
        return self.wait_event("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    def drain(self, quiet=0.3):
        while self._next(quiet) is not None:
            pass
        return self.events

    def names(self):
        """Events as compact strings: 'JOB_STATUS_CHANGE:ready', 'BLOCK_JOB_READY'."""
        out = []
        for e in self.events:
            if e["event"] == "JOB_STATUS_CHANGE":
                out.append("JOB_STATUS_CHANGE:" + e["data"]["status"])
            else:
                out.append(e["event"])
        return out

    def job(self, job_id):
        for info in self.execute("query-block-jobs"):
            if info["device"] == job_id:
                return info
        return None

    def close(self):
        self.client.close()
