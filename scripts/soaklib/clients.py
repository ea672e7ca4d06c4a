"""The disk's clients: a writer that keeps the model, a reader that checks against it.

Each holds one libnbd connection to the served disk and opens a new one after the
server restarted.  Every request's start, end and error are recorded for the checks
(latency bounds, errors only where a fault allows them).  pause() returns once the
client has no request in flight: the full checks and the point-in-time commands
(drive-backup, bitmap commands) need the model exact.
"""

import random
import threading
import time

import nbd

from .model import BLOCK, Change

MiB = 1 << 20
CLUSTER = 65536          # trims are whole clusters: they then read as zeros (docs/overlay.md)


class Request:
    __slots__ = ("client", "kind", "start", "end", "error", "generation")

    def __init__(self, client, kind, start, end, error, generation):
        self.client, self.kind, self.start, self.end = client, kind, start, end
        self.error, self.generation = error, generation

    @property
    def seconds(self):
        return self.end - self.start


def random_length(rnd, largest=MiB):
    """4K to 1M, mostly small (as a guest's I/O is)."""
    r = rnd.random()
    if r < 0.6:
        blocks = rnd.randint(1, 16)
    elif r < 0.9:
        blocks = rnd.randint(16, 64)
    else:
        blocks = rnd.randint(64, largest // BLOCK)
    return blocks * BLOCK


class Client(threading.Thread):
    """A thread with one connection to the disk, paused and resumed by the soak."""

    def __init__(self, name, rig, model, seed, pace):
        super().__init__(name=name, daemon=True)
        self.rig, self.model = rig, model
        self.rnd = random.Random(seed)
        self.pace = pace
        self.requests = []                # Request records not yet taken by a check
        self.problems = []                # (time, text): wrong bytes read
        self.count = 0
        self._lock = threading.Lock()
        self._want_pause = threading.Event()
        self._idle = threading.Event()
        self._halt = threading.Event()
        self._h = None
        self._generation = None
        self.in_flight_since = None       # when the request in flight started

    # -- the soak's side -------------------------------------------------------

    def pause(self, timeout):
        """Wait until no request is in flight; False if that took longer than timeout."""
        self._want_pause.set()
        return self._idle.wait(timeout)

    def resume(self):
        self._want_pause.clear()

    def stop(self):
        self._halt.set()
        self._want_pause.set()
        self.join(30)

    def take_requests(self):
        with self._lock:
            out, self.requests = self.requests, []
        return out

    # -- the thread -------------------------------------------------------------

    def run(self):
        while not self._halt.is_set():
            if self._h is not None and self._generation != self.rig.generation:
                self._drop()              # the server went: let nbdkit's SIGTERM finish
            self._idle.clear()
            if self._want_pause.is_set() or self.held():
                self._idle.set()
                time.sleep(0.005)
                continue
            h = self._handle()
            if h is None:
                self._idle.set()
                time.sleep(0.02)
                continue
            self.one(h)
            self.count += 1
            if self.pace:
                time.sleep(self.rnd.uniform(0, 2 * self.pace))
        self._idle.set()

    def held(self):
        """True while the client must not issue anything (subclasses)."""
        return False

    def _handle(self):
        if self._h is None:
            with self.rig.connect_lock:
                if not self.rig.up:
                    return None
                generation = self.rig.generation
                h = nbd.NBD()
                try:
                    h.connect_uri(self.rig.disk_uri)
                except nbd.Error:
                    return None
            self._h, self._generation = h, generation
        return self._h

    def _drop(self):
        self._h = None                   # libnbd closes a handle when it is collected

    def timed(self, kind, call):
        """Run call(); record it; returns (ok, value)."""
        start = self.in_flight_since = time.monotonic()
        try:
            value = call()
        except nbd.Error as e:
            self._record(kind, start, "%s: %s" % (e.errno, e.string))
            self._drop()
            return False, None
        finally:
            self.in_flight_since = None
        self._record(kind, start, None)
        return True, value

    def _record(self, kind, start, error):
        r = Request(self.name, kind, start, time.monotonic(), error, self._generation)
        with self._lock:
            self.requests.append(r)


class Writer(Client):
    """Random 4K-1M writes, zeroes, whole-cluster trims and flushes; keeps the model."""

    def held(self):
        # After a change that failed, nothing more until a full read settled it.
        return bool(self.model.doubtful)

    def one(self, h):
        rnd, size = self.rnd, self.model.size
        r = rnd.random()
        if r < 0.62:
            n = random_length(rnd)
            change = Change("write", rnd.randrange(0, (size - n) // BLOCK + 1) * BLOCK, n,
                            rnd.randbytes(n))
            call = lambda: h.pwrite(change.data, change.offset)
        elif r < 0.74:
            n = random_length(rnd)
            change = Change("zero", rnd.randrange(0, (size - n) // BLOCK + 1) * BLOCK, n)
            flags = nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0
            call = lambda: h.zero(change.length, change.offset, flags)
        elif r < 0.82:
            n = rnd.randint(1, 16) * CLUSTER
            change = Change("trim", rnd.randrange(0, (size - n) // CLUSTER + 1) * CLUSTER, n)
            call = lambda: h.trim(change.length, change.offset)
        else:
            change = Change("flush")
            call = h.flush
        self.model.begin(change)
        ok, _ = self.timed(change.kind, call)
        if ok:
            self.model.acked(change)
        else:
            self.model.failed(change)


class Reader(Client):
    """Random 4K-1M reads, each compared with the model (skipped if a change overlapped)."""

    skipped = 0

    def one(self, h):
        rnd, size = self.rnd, self.model.size
        n = random_length(rnd)
        offset = rnd.randrange(0, (size - n) // BLOCK + 1) * BLOCK
        since = self.model.read_begin(offset, n)
        if since is None:
            self.skipped += 1
            return
        ok, got = self.timed("read", lambda: h.pread(n, offset))
        if not ok:
            return
        problem = self.model.read_check(offset, n, since, bytes(got))
        if problem is not None:
            with self._lock:
                self.problems.append((time.monotonic(), problem))
