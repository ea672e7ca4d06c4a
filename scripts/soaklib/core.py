"""The soak's state between steps: the rig, the model, the clients, the job running,
and the helpers the operations share.  invariants.py checks it after every step."""

import collections
import contextlib
import time

from . import invariants
from .bounds import CANCEL_BOUND, PAUSE_TIMEOUT, RETIRED_KEPT, Skip, Violation
from .clients import Reader, Writer
from .model import DiskModel
from .rig import QMPError, Rig, Target


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
        self.counts = collections.Counter()
        self.maxima = collections.defaultdict(float)
        self.rss = []                     # (server generation, RSS) at every check
        self._events_pos = 0
        self.allowances = collections.deque(maxlen=64)   # (from, to, extra seconds)
        self.cancels = []                # (asked, event came, kind) of forced cancels
        self.error_windows = collections.deque(maxlen=16)   # (from, to, errno name)
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
        self.error_windows.append((start, end, errno_name))

    def allow(self, seconds):
        """Client requests of this step may wait `seconds` more (a stopped target...)."""
        self.allowances.append((self._step_start, None, seconds))

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

    def ready_job(self, kinds, wait=5.0):
        """The running job if it is of one of `kinds` and ready (waiting up to `wait` s
        for that); Skip otherwise."""
        job = self.job
        if job is None or job.kind not in kinds:
            raise Skip("no %s job" % "/".join(kinds))
        deadline = time.monotonic() + wait
        while True:
            info = self.job_info()
            if info is not None and info["ready"]:
                return job, info
            if info is None or info["paused"] or time.monotonic() > deadline:
                raise Skip("%s is not ready" % job.id)
            time.sleep(0.1)

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
                    self.cancels.append((t0, when, job.kind))
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
        if self.job is not None and self.job.kind == "mirror":
            # A mirror that comes back has forgotten a complete asked before the
            # restart (docs/jobs.md, "A crash during complete": `complete` again); a
            # soft cancel then ends it without a pivot.
            self.job.complete_asked = False

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

    def bitmap_extents(self, name):
        out, offset = [], 0
        while True:
            reply = self.qmp("x-block-dirty-bitmap-extents",
                             {"node": "disk0", "name": name, "offset": offset})
            out += [(e["offset"], e["length"]) for e in reply["extents"]]
            if "next" not in reply:
                return out
            offset = reply["next"]

    def check(self):
        invariants.check(self)

    def begin_step(self):
        self._step_start = time.monotonic()
        self.settle()                     # a job that ended meanwhile is no longer there

