"""The soak's state between steps, and the invariants checked after every step.

Bounds (docs/soak.md says where each comes from):
"""

import collections
import contextlib
import os
import random
import re
import time

import nbd

from .clients import Reader, Writer
from .model import BitmapModel, DiskModel, first_missing
from .rig import RECONNECT_DELAY, QMPError, Rig, Target

MiB = 1 << 20

REQUEST_BOUND = 4.0      # a client request, with no fault in its way (write-through: 2 s)
FINAL_SYNC = 10.0 + RECONNECT_DELAY   # complete / soft cancel may hold clients this long
QMP_BOUND = 5.0          # a QMP reply (drive-mirror waits 1 s for its target; a quiesce
                         # waits for requests in flight, a write-through 2 s)
CANCEL_BOUND = 4.0       # a forced cancel to BLOCK_JOB_CANCELLED (docs/errors.md: about 3 s)
CANCEL_FREE = 0.5        # no client request waits longer than this past a forced cancel
CANCEL_SLACK = 0.25      # a backup frees a client waiting to copy before write as it
                         # cleans up: by its event (docs/backup.md), plus this
SIGTERM_BOUND = 5.0      # nbdkit's exit after SIGTERM
FD_BOUND = 256           # the disk's nbdkit: open descriptors
RSS_BOUND = 320 * MiB    # and resident memory
PAUSE_TIMEOUT = 30.0     # clients reach a request boundary (their requests are bounded)
JOB_END_WAIT = FINAL_SYNC + 5
RETIRED_KEPT = 3         # targets of ended jobs kept served, to see that nothing writes
RETIRED_GRACE = 1.0      # after the job or a SIGCONT: late answers to abandoned writes


# nbdkit's python plugin prints the traceback of every error a request returns to its
# client ("python.1: error: .../overlaydisk.py: pwrite: error: Traceback ..."): those are
# client errors, which the request checks judge; any other traceback is a violation.
TRACEBACK = re.compile(r"^.*Traceback.*$", re.M)
REQUEST_ERROR = re.compile(r"overlaydisk\.py: (pread|pwrite|zero|trim|flush|extents|cache): "
                           r"error: Traceback")


class Violation(Exception):
    """An invariant does not hold: the soak stops here."""


class Skip(Exception):
    """The step does not apply now (no job, a job already runs, ...)."""


class JobTrack:
    """A job the soak started, and what its end must show."""

    def __init__(self, job_id, kind, target=None, **info):
        self.id, self.kind, self.target = job_id, kind, target
        self.info = info                  # sync, copy-mode, snapshot, bitmap, export...
        self.outcome = None               # completed / failed: ... / cancelled / unknown
        self.complete_asked = self.soft_cancel_asked = False
        self.faulted = []                 # faults that touched it (they may fail it)
        self.on_end = None                # fn(soak, track) run when it ends
        self.started = 0.0

    def __repr__(self):
        return "%s %s" % (self.kind, self.id)


class Soak:
    def __init__(self, seed, workdir, size, pace=0.015):
        self.seed = seed
        self.rig = Rig(workdir, size, seed)
        with open(self.rig.base_path, "rb") as f:
            self.model = DiskModel(f.read())
        self.writer = Writer("writer", self.rig, self.model, seed * 7 + 1, pace)
        self.reader = Reader("reader", self.rig, self.model, seed * 7 + 2, pace * 2)
        self.job = None                   # the JobTrack running (one job per device)
        self.targets = []
        self.retired = []                 # targets of ended jobs (RETIRED_KEPT still served)
        self.store = None                 # the Target the disk was pivoted to
        self.base_gone = False            # a stream completed: no base any more
        self.chain = None                 # (bitmap name, bytes at its last backup)
        self.steps = []                   # (index, op name, what it did, seconds)
        self.notes = []
        self.counts = collections.Counter()
        self.maxima = collections.defaultdict(float)
        self.rss = []                     # (server generation, RSS) at every check
        self._events_pos = 0
        self._allowances = collections.deque(maxlen=64)   # (from, to, extra seconds)
        self._cancels = []                # (asked, event came, kind) of forced cancels
        self._error_windows = collections.deque(maxlen=16)   # (from, to, errno name)
        self._step_start = time.monotonic()
        self._names = collections.Counter()

    # -- set-up -----------------------------------------------------------------

    def start(self):
        self.rig.start()
        self.writer.start()
        self.reader.start()

    def close(self):
        for client in (self.writer, self.reader):
            if client.is_alive():
                client.stop()
        for t in self.targets:
            if t.stopped:
                t.cont()
        self.rig.close()

    def name(self, prefix):
        self._names[prefix] += 1
        return "%s%d" % (prefix, self._names[prefix])

    # -- helpers for the steps -----------------------------------------------------

    def qmp(self, command, args=None):
        return self.rig.qmp(command, args)

    def try_qmp(self, command, args=None):
        """(True, value) or (False, 'Class: desc')."""
        try:
            return True, self.rig.qmp(command, args)
        except QMPError as e:
            return False, "%s: %s" % (e.cls, e.desc)

    @contextlib.contextmanager
    def clients_paused(self):
        """No client request in flight inside (the model is exact)."""
        try:
            for client in (self.writer, self.reader):
                if not client.pause(PAUSE_TIMEOUT):
                    raise Violation("%s still had a request in flight after %ds"
                                    % (client.name, PAUSE_TIMEOUT))
            yield
        finally:
            self.writer.resume()
            self.reader.resume()

    def allow_errors(self, start, end, errno_name):
        """Client requests in [start, end] may fail with this errno (a full filesystem)."""
        self._error_windows.append((start, end, errno_name))

    def allow(self, seconds):
        """Client requests of this step may wait `seconds` more (a stopped target...)."""
        self._allowances.append((self._step_start, None, seconds))

    def new_target(self, rnd, prefix, kinds=("file", "nbd", "nbd", "tls", "far"), fill=None):
        kind = rnd.choice(kinds)
        target = Target(self.rig, self.name(prefix), kind,
                        errno=rnd.choice(("EIO", "ENOSPC")), fill=fill)
        self.targets.append(target)
        return target

    def start_job(self, track, command, args):
        """Issue the command that starts a job; Skip if the server refuses it."""
        if self.job is not None:
            raise Skip("job %s runs" % self.job.id)
        self._events_pos = len(self.rig.events.log)
        ok, value = self.try_qmp(command, args)
        if not ok:
            if track.target is not None:
                track.target.close()
            raise Skip("refused: %s" % value)
        track.started = time.monotonic()
        self.job = track
        self.counts["job " + track.kind] += 1
        return value

    def job_info(self):
        if self.job is None:
            return None
        return self.rig.jobs().get(self.job.id)

    def wait_end(self, timeout):
        """Wait for the job to conclude (events); True if it did.  A job that waits in
        pending (auto-finalize=false) is finalized, as its operator would."""
        deadline = time.monotonic() + timeout
        job = self.job
        while time.monotonic() < deadline:
            self.settle()
            if self.job is None:
                return True
            if not job.info.get("auto_finalize", True):
                info = self.job_info()
                if info is not None and info["status"] == "pending":
                    self.try_qmp("job-finalize", {"id": job.id})
            time.sleep(0.05)
        return False

    def forced_cancel(self):
        """Cancel the job (force); its BLOCK_JOB_CANCELLED within CANCEL_BOUND."""
        job = self.job
        t0 = time.monotonic()
        ok, why = self.try_qmp("block-job-cancel", {"device": job.id, "force": True})
        if not ok:
            return "refused: " + why
        while time.monotonic() - t0 < CANCEL_BOUND:
            for when, e in self.rig.events.since(self._events_pos):
                if (e["event"] in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")
                        and e["data"].get("device") == job.id):
                    self._cancels.append((t0, when, job.kind))
                    self.maxima["forced cancel s"] = max(self.maxima["forced cancel s"],
                                                         when - t0)
                    self.settle()
                    return "cancelled in %.2fs" % (when - t0)
            time.sleep(0.01)
        raise Violation("forced cancel of %s: no BLOCK_JOB_CANCELLED within %.1fs"
                        % (job, CANCEL_BOUND))

    # -- jobs ending --------------------------------------------------------------

    def settle(self):
        """Act on the events that arrived: the job's end, its checks."""
        job = self.job
        if job is None:
            return
        for when, e in self.rig.events.since(self._events_pos):
            self._events_pos += 1
            data = e.get("data", {})
            if data.get("device") != job.id:
                continue
            if e["event"] == "BLOCK_JOB_CANCELLED":
                self._end(job, "cancelled")
                return
            if e["event"] == "BLOCK_JOB_COMPLETED":
                self._end(job, "failed: %s" % data["error"] if "error" in data else "completed")
                return

    def forget_unknown_job(self):
        """After a restart: a job the server no longer lists ended while we looked away."""
        if self.job is not None and self.job.id not in self.rig.jobs():
            self.settle()
            if self.job is not None:
                self._end(self.job, "unknown")

    def _end(self, job, outcome):
        job.outcome = outcome
        self.job = None
        self.counts["%s %s" % (job.kind, outcome.split(":")[0])] += 1
        if outcome.startswith("failed") and not job.faulted:
            raise Violation("%s failed with no fault in its way: %s" % (job, outcome))
        if job.on_end is not None:
            job.on_end(self, job)
        if job.target is not None and job.target is not self.store:
            self.retire(job.target)

    def retire(self, target):
        """A target whose job ended: nothing may write to it any more (once what a
        write-blocking mirror abandoned on it has landed).  The last few stay served."""
        target.retired = time.monotonic()
        target.baseline = None
        self.retired.append(target)
        if len(self.retired) > RETIRED_KEPT:
            self.retired.pop(0).close()

    def _check_retired(self):
        now = time.monotonic()
        for t in self.retired:
            if t.stopped or now - max(t.retired, t.running_since) < RETIRED_GRACE:
                continue
            mtime = os.stat(t.path).st_mtime_ns
            if t.baseline is None:
                t.baseline = mtime
            elif mtime != t.baseline:
                raise Violation("%r was written after its job ended" % t)

    def restarted(self, how):
        """The disk's nbdkit started again on its state directory."""
        for name, bitmap in list(self.model.bitmaps.items()):
            if not bitmap.persistent:
                del self.model.bitmaps[name]
                if self.chain and self.chain[0] == name:
                    self.chain = None
        if self.job is not None:
            self.job.faulted.append(how)
        self.forget_unknown_job()

    def fresh_disk(self):
        """Throw the disk away and serve a new one over the base (the clients idle)."""
        with self.clients_paused():
            if self.job is not None:
                self.job.faulted.append("disk thrown away")
                self._end(self.job, "cancelled")
            if self.store is not None:
                self.store.protected = False
                self.retire(self.store)
            self.store, self.base_gone, self.chain = None, False, None
            self.rig.fresh(self.name("ov-"))
            with open(self.rig.base_path, "rb") as f:
                self.model.reset(f.read())

    # -- the checks after every step -----------------------------------------------

    def check(self):
        rig = self.rig
        if not rig.alive:
            raise Violation("the disk's nbdkit exited (%s)" % rig.disk.proc.returncode)
        self.settle()
        with self.clients_paused():
            self._check_disk()
            self._check_bitmaps()
            if self.store is not None and self.store.read() != self.model.snapshot():
                raise Violation("the disk is served from %s, which differs from the model"
                                % self.store)
        self._check_retired()
        self._check_clients()
        self._check_replies()
        self._check_log_and_process()
        self._cancels = []

    def read_disk(self, uri=None):
        h = nbd.NBD()
        h.connect_uri(uri or rig_uri(self.rig))
        try:
            step = 4 * MiB
            return b"".join(bytes(h.pread(min(step, self.model.size - o), o))
                            for o in range(0, self.model.size, step))
        finally:
            h.shutdown()

    def _check_disk(self):
        problems = self.model.verify(self.read_disk())
        if problems:
            raise Violation("the disk differs from the model:\n  " + "\n  ".join(problems))

    def bitmap_extents(self, name):
        out, offset = [], 0
        while True:
            reply = self.qmp("x-block-dirty-bitmap-extents",
                             {"node": "disk0", "name": name, "offset": offset})
            out += [(e["offset"], e["length"]) for e in reply["extents"]]
            if "next" not in reply:
                return out
            offset = reply["next"]

    def _check_bitmaps(self):
        listed = {b["name"]: b for b in self.rig.block()["dirty-bitmaps"]}
        if set(listed) != set(self.model.bitmaps):
            raise Violation("bitmaps listed %s, expected %s"
                            % (sorted(listed), sorted(self.model.bitmaps)))
        for name, bitmap in self.model.bitmaps.items():
            info = listed[name]
            if info["recording"] != bitmap.recording or info["persistent"] != bitmap.persistent:
                raise Violation("bitmap %s is %s, expected %s" % (name, info, bitmap.describe()))
            extents = self.bitmap_extents(name)
            gap = first_missing(bitmap.changes, extents, bitmap.granularity)
            if gap is not None:
                raise Violation("bitmap %s misses changed range %d+%d" % (bitmap.describe(),
                                                                           gap[0], gap[1]))
            if bitmap.exact is not None and extents != bitmap.exact:
                raise Violation("disabled bitmap %s changed" % bitmap.describe())

    def _extra_allowed(self, r):
        return max([extra for start, end, extra in self._allowances
                    if start <= r.end and (end is None or r.start <= end)] or [0.0])

    def _check_clients(self):
        for client in (self.writer, self.reader):
            for when, problem in client.problems:
                raise Violation("%s: %s" % (client.name, problem))
            for r in client.take_requests():
                self.maxima["request s"] = max(self.maxima["request s"], r.seconds)
                if r.error is not None:
                    if any(s <= r.end and r.start <= e and r.error.startswith(name + ":")
                           for s, e, name in self._error_windows):
                        self.counts["client errors allowed"] += 1
                        continue
                    if r.generation == self.rig.generation:
                        raise Violation("%s's %s failed with the server up: %s"
                                        % (r.client, r.kind, r.error))
                    continue
                bound = REQUEST_BOUND + self._extra_allowed(r)
                if r.seconds > bound:
                    raise Violation("%s's %s took %.2fs (bound %.1fs)"
                                    % (r.client, r.kind, r.seconds, bound))
                for asked, came, kind in self._cancels:
                    waited = r.end - max(r.start, asked)
                    if waited > CANCEL_FREE and (kind == "mirror" or r.end > came + CANCEL_SLACK):
                        raise Violation("%s's %s went on %.2fs after a forced cancel was asked "
                                        "(%.2fs after its event)"
                                        % (r.client, r.kind, waited, r.end - came))
        now = time.monotonic()
        self._allowances = collections.deque(
            ((s, now if e is None else e, x) for s, e, x in self._allowances), maxlen=64)

    def _check_replies(self):
        for command, seconds, start in self.rig.qmp_times:
            self.maxima["qmp reply s"] = max(self.maxima["qmp reply s"], seconds)
            if seconds > QMP_BOUND:
                raise Violation("the reply to %s took %.2fs (bound %.1fs)"
                                % (command, seconds, QMP_BOUND))
        self.rig.qmp_times.clear()

    def _check_log_and_process(self):
        text = self.rig.new_log()
        for match in TRACEBACK.finditer(text):
            if REQUEST_ERROR.search(match.group(0)):
                continue          # an error returned to a client: _check_clients judges it
            at = match.start()
            raise Violation("a Python traceback in the server log:\n"
                            + text[max(0, at - 600):at + 2000])
        rss, fds = self.rig.process()
        self.rss.append((self.rig.generation, rss))
        self.maxima["rss MiB"] = max(self.maxima["rss MiB"], rss / MiB)
        self.maxima["fds"] = max(self.maxima["fds"], fds)
        if rss > RSS_BOUND or fds > FD_BOUND:
            raise Violation("the server holds %d MiB and %d descriptors (bounds %d MiB, %d)"
                            % (rss // MiB, fds, RSS_BOUND // MiB, FD_BOUND))

    def begin_step(self):
        self._step_start = time.monotonic()
        self.settle()                     # a job that ended meanwhile is no longer there


def rig_uri(rig):
    return rig.disk_uri


def bitmap_model(soak, name, granularity, persistent, recording):
    return BitmapModel(name, soak.model.size, granularity, persistent, recording)


def step_random(seed, index):
    return random.Random("%d:%d" % (seed, index))
