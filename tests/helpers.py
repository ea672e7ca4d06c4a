"""What many tests share: a QMP session, a writing client, a background jobctl, pid files.

- Control: a negotiated QMP session on a control socket that records every event.
- Writer: a client writing through its own NBD connection in a thread, at a guest's pace.
- Background: a jobctl process that runs while the test acts (`wait`, `events`).
- jobctl_path(): the installed console script.
- wait_for_pidfile(): the pid a daemonized server wrote, once it is there.

Every wait here is for an event, with a bound: nothing sleeps a fixed time.
"""

import os
import pathlib
import random
import select
import signal
import subprocess
import sys
import threading
import time

import nbd
import pytest

from jobctl.qmp_client import QMPClient
from plugin.qmp.job_info import block_job_info

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT = 30


# -- QMP ------------------------------------------------------------------------------------------

class Control:
    """A negotiated QMP session that records every event it sees, in order.

    wait_event() returns the next matching event after the last one it returned;
    `events` keeps them all (names() for the order a test expects).
    """

    def __init__(self, path, timeout=TIMEOUT):
        self.client = QMPClient(str(path), timeout=timeout)
        self.client.connect()
        self.events = []
        self._pos = 0                # wait_event() looks at events from here on

    def __call__(self, command, **args):
        """Run `command`; argument names with '_' for '-' (job_id= is "job-id")."""
        return self.client.execute(command, {k.replace("_", "-"): v for k, v in args.items()})

    def execute(self, command, args=None):
        return self.client.execute(command, args or {})

    def _next(self, timeout):
        event = self.client.next_event(timeout)
        if event is not None:
            self.events.append(event)
        return event

    def wait_event(self, name, timeout=60, **match):
        """The next event `name` whose data has the `match` items ('_' for '-' in their names)."""
        match = {k.replace("_", "-"): v for k, v in match.items()}

        def matches(e):
            return e["event"] == name and all(e["data"].get(k) == v for k, v in match.items())

        deadline = time.monotonic() + timeout
        seen = len(self.events)
        i = self._pos
        while True:
            while i < len(self.events):
                if matches(self.events[i]):
                    self._pos = i + 1
                    return self.events[i]
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s %r within %ss; events: %s"
                                     % (name, match, timeout, self.names()[max(0, seen - 5):]))
            self._next(left)

    def wait_status(self, job, status, timeout=60):
        return self.wait_event("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    def drain(self, quiet=0.3):
        """Read events until none came for `quiet` seconds; returns them all."""
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

    def statuses(self, job_id):
        """The JOB_STATUS_CHANGE statuses of job_id seen so far, in order."""
        while self._next(0) is not None:
            pass
        return [e["data"]["status"] for e in self.events
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]

    def job(self, job_id="disk0"):
        """query-block-jobs' entry of job_id, or None."""
        for info in self.execute("query-block-jobs"):
            if info["device"] == job_id:
                return info
        return None

    def wait_job(self, predicate, job_id="disk0", timeout=TIMEOUT, interval=0.02):
        """The job's query-block-jobs entry once predicate(entry) holds."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info is not None and predicate(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError("job %s never matched; last %s" % (job_id, info))
            time.sleep(interval)

    def block(self):
        """query-block's entry of the (one) disk."""
        return self.execute("query-block")[0]

    def close(self):
        self.client.close()


# -- a writing client -----------------------------------------------------------------------------

class Writer(threading.Thread):
    """Writes through its own NBD connection until finish(), `pace` seconds apart.

    By default each step writes random bytes (a length from `lengths`) at a random
    `align`-aligned offset of a `size`-byte disk, kept in `writes` if `record`.
    Subclasses override step() for other patterns.  An exception in a step stops
    the writer (and `stop`, which writers may share) and is raised by finish();
    one of the `tolerate` types just ends it (a server killed on purpose).
    """

    def __init__(self, uri, size=None, *, seed=0, lengths=(512, 4096, 65536), align=1,
                 pace=0.001, record=False, stop=None, tolerate=()):
        super().__init__(daemon=True, name="writer")
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size, self.lengths, self.align = size, lengths, align
        self.rnd = random.Random(seed)
        self.pace = pace
        self.record = record
        self.stop_event = stop or threading.Event()
        self.tolerate = tuple(tolerate)
        self.count = 0               # steps done
        self.writes = []             # (offset, data) with record=True
        self.error = None
        self._cond = threading.Condition()
        self._ended = False

    def step(self):
        length = self.rnd.choice(self.lengths)
        offset = self.rnd.randrange((self.size - length) // self.align + 1) * self.align
        data = self.rnd.randbytes(length)
        self.h.pwrite(data, offset)
        if self.record:
            self.writes.append((offset, data))

    def run(self):
        try:
            while not self.stop_event.is_set():
                self.step()
                with self._cond:
                    self.count += 1
                    self._cond.notify_all()
                # A guest's pace, not a flood: an unpaced writer can dirty a small
                # disk faster than a background mirror copies it (docs/mirror.md,
                # copy-mode), so READY would depend on the machine's load.
                self.stop_event.wait(self.pace)
        except self.tolerate:
            pass
        except BaseException as e:       # raised by finish(), never lost in a thread
            self.error = e
            self.stop_event.set()
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def wait_for(self, more, timeout=60):
        """Wait until `more` steps were done after this call; returns the count."""
        with self._cond:
            target = self.count + more
            done = self._cond.wait_for(lambda: self.count >= target or self._ended, timeout)
            if self.error is not None:
                raise self.error
            assert done and self.count >= target, \
                "%d of %d more writes in %ss" % (self.count - target + more, more, timeout)
            return self.count

    def finish(self, timeout=60):
        """Stop, disconnect, raise what went wrong; returns the number of steps."""
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not stop"
        try:
            self.h.shutdown()
        except nbd.Error:
            pass                         # the server is gone
        if self.error is not None:
            raise self.error
        return self.count


# -- jobctl ---------------------------------------------------------------------------------------

def jobctl_path():
    """The console script installed in the venv running the tests."""
    for candidate in (pathlib.Path(sys.executable).parent / "jobctl",
                      REPO / ".venv" / "bin" / "jobctl"):
        if candidate.exists():
            return str(candidate)
    pytest.fail("jobctl is not installed: run .venv/bin/python -m pip install -e .")


def read_line(stream, timeout=TIMEOUT):
    """One line of a child's unbuffered pipe, waited for up to timeout."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no output in time"
    return stream.readline()


def _default_sigint():
    # A test run started in a shell's background inherits SIGINT ignored; the tests
    # that interrupt jobctl need Python's own handler, which it installs only then.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Background:
    """A jobctl process running while the test acts; killed by pid at the end.

    where: the control socket's path, or anything with a `sock` (a server, a disk).
    """

    def __init__(self, where, *args, timeout=TIMEOUT):
        sock = str(getattr(where, "sock", where))
        self.timeout = timeout
        self.proc = subprocess.Popen([jobctl_path(), "--socket", sock, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     bufsize=0,    # unbuffered: select() sees every line
                                     preexec_fn=_default_sigint)

    def line(self):
        return read_line(self.proc.stdout, self.timeout).decode()

    def wait_stderr(self, text):
        """Read stderr lines until one contains `text` (with --debug: a log line)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = read_line(self.proc.stderr, max(0.01, deadline - time.monotonic())).decode()
            assert line, "jobctl exited: code %s" % self.proc.poll()
            if text in line:
                return line
        pytest.fail(f"jobctl never logged {text!r}")

    def finish(self):
        out, err = self.proc.communicate(timeout=self.timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- daemons --------------------------------------------------------------------------------------

def wait_for_pidfile(path, timeout=TIMEOUT):
    """The pid a daemonized server wrote to `path`, once it is there and that process lives.

    A daemon's first process exits before its child writes the pid file (nbdkit -P):
    the file may not exist yet, or be empty, when the command that started it returns.
    """
    path = pathlib.Path(path)
    deadline = time.monotonic() + timeout
    text = None
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        if text is not None and text.endswith("\n") and text.strip().isdigit():
            pid = int(text)
            if os.path.exists("/proc/%d" % pid):
                return pid
        assert time.monotonic() < deadline, \
            "no live pid in %s within %ss (it holds %r)" % (path, timeout, text)
        time.sleep(0.01)


# -- a disk in this process, its jobs on a clock the test steps -----------------------------------

def step_clock(clock, job, seconds, timeout=TIMEOUT):
    """Advance a ManualClock and return once `job` has done what that time allows: its
    thread sleeps on the clock again, or has ended.  For a job that sleeps in one
    thread; step_clock(clock, job, 0) settles a job that something else woke (a kick).

    Why this is exact: a sleeping job has begun a wait on the clock while holding its
    lock, so advance() cannot miss it; the next wait it begins comes after all it
    could do at the new time (the clock does not move meanwhile).
    """
    begun = clock.waits_begun()
    clock.advance(seconds)
    deadline = time.monotonic() + timeout
    while not clock.wait_for_waits(begun + 1, 0.05):
        if job.join(0):
            return
        assert time.monotonic() < deadline, \
            "the job did not go back to sleep in %ss: %s" % (timeout, block_job_info(job))


class LocalDisk:
    """Our disk served inside the test process: the plugin's Service over a temp state
    directory (real Disk, store, base and targets; no nbdkit, no QMP socket).

    Jobs built here (mirror()) run on a ManualClock that only step() moves: a test
    checks a rate, a back-off or the spacing of events to the step, whatever the
    machine's load.  `events` holds (clock seconds since start, event) for every
    event the disk's bus emitted.
    """

    STEP = 0.01

    def __init__(self, tmp_path, base, **keys):
        from plugin.jobs.clock import ManualClock
        from plugin.service import Service
        self.service = Service()
        self.service.configure("overlay", str(pathlib.Path(tmp_path) / "local-ov"))
        if base is not None:
            self.service.configure("base", str(base))
        for key, value in keys.items():
            self.service.configure(key.replace("_", "-"), str(value))
        self.service.open()
        self.disk = self.service.disk
        self.size = self.disk.size
        self.clock = ManualClock()
        self.start = self.clock.now()
        self.events = []
        self._sub = self.service.bus.subscribe(maxlen=1 << 20)
        self.job = None

    def mirror(self, target, **options):
        """A mirror of the disk to `target` (MirrorJob's arguments), started as
        drive-mirror starts one (registry, dirty tracking, thread), and settled."""
        from plugin.jobs.mirror import MirrorJob
        job = MirrorJob("disk0", self.service.bus, self.disk, str(target), clock=self.clock,
                        pivot=self.service.pivot_to, **options)
        self.service.jobs.add(job)
        job.attach()
        job.start()
        self.job = job
        self.settle()
        return job

    def stream(self, **options):
        """A stream of the base into the disk (StreamJob's arguments), started as
        block-stream starts one, and settled."""
        from plugin.jobs.stream import StreamJob
        job = StreamJob("disk0", self.service.bus, self.disk, clock=self.clock, **options)
        self.service.jobs.add(job)
        job.start()
        self.job = job
        self.settle()
        return job

    def now(self):
        """Clock seconds since the disk was made."""
        return self.clock.now() - self.start

    def step(self, seconds, timeout=TIMEOUT):
        """Move the clock and wait until the job has done what that time allows: it
        sleeps on the clock again (or its thread ended).  step(0) settles the job
        after something else woke it (a client write, a verb)."""
        step_clock(self.clock, self.job, seconds, timeout)
        self._collect()

    def settle(self):
        self.step(0)

    def run(self, seconds, until=None, on_step=None, step=None):
        """Step the clock for up to `seconds` (STEP at a time), calling on_step() after
        each step; stop early once until() is true.  Returns the clock time it took."""
        step = step or self.STEP
        begin = self.clock.now()
        while self.clock.now() - begin < seconds - 1e-9:
            if until is not None and until():
                break
            self.step(step)
            if on_step is not None:
                on_step()
        return self.clock.now() - begin

    def _collect(self):
        for event in self._sub.drain():
            self.events.append((self.now(), event))

    def wait_event(self, name, timeout=TIMEOUT, **match):
        """Wait (real time, without moving the clock) for an event `name` with `match` in
        its data, among those since the job started; returns (clock time, event)."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            for t, e in self.events:
                if e["event"] == name and all(e["data"].get(k) == v for k, v in match.items()):
                    return t, e
            assert time.monotonic() < deadline, "no %s %r within %ss; events: %s" % (
                name, match, timeout, [e["event"] for _, e in self.events])
            time.sleep(0.01)

    def named(self, name):
        """(clock time, data) of every event `name` so far."""
        self._collect()
        return [(t, e["data"]) for t, e in self.events if e["event"] == name]

    def read(self, offset=0, length=None):
        buf = bytearray(self.size - offset if length is None else length)
        self.disk.read(buf, offset)
        return bytes(buf)

    def write(self, data, offset):
        """A client write (as nbdkit's pwrite), then the job settled."""
        self.disk.write(data, offset)
        if self.job is not None:
            self.settle()

    def complete(self, timeout=TIMEOUT):
        """block-job-complete, and wait for the job to end (prepare and pivot need no
        clock time)."""
        self.job.user_complete()
        self.wait_event("JOB_STATUS_CHANGE", timeout, id="disk0", status="null")

    def close(self):
        self.service.stop()
