"""The served disk: what NBD clients read and write.

The disk forwards requests to its store: the overlay (OverlayStore) or, after a
mirror pivot, the mirror target (BackendStore).  Around that it offers what
jobs need:

- listeners: fn(kind, offset, length, buf) runs after every completed write
  ("write", with the client's buffer), zero or trim, in the client's thread;
  the mirror's dirty bitmap and its write-blocking mode are listeners.  A
  listener runs after the change completed, so a job that copies a range and
  then sees it dirtied copies it again.
- guards: objects with begin(offset, length) -> token, persist(token) and
  end(token), run around every write, zero or trim: begin and persist BEFORE
  the store is touched (persist again before each retry of a held request),
  end after the listeners, whether the change succeeded or not.  The mirror's
  write-intent log (plugin/blockcopy/intent.py) is a guard: its record that a
  region may differ from the target must be durable before a client's bytes
  can reach data.img.  persist() raising OSError is a write error of the disk
  (werror applies: the record is part of the disk's storage).
- a marker: fn(offset, length) run before every write, zero or trim is
  issued to the store (and again before each retry of a held one): the dirty
  bitmaps (bitmaps.py) mark the change there, so it is in every recording
  bitmap before it can reach the disk and before it is acknowledged.
- a gate: every request passes it; quiesce() closes it and waits for the
  requests in progress, so a job can copy the last dirty bytes and pivot while
  no request runs.  hold()/release() close it for the operator (QMP stop/cont).
- guest-facing error policy (werror for writes, rerror for reads): every
  failure of the disk's own storage emits BLOCK_IO_ERROR; with action "stop"
  the failing request is held (outside the gate) until QMP cont, then
  retried, so nothing acknowledged is lost and the client never sees the error.
"""

import collections
import contextlib
import errno
import logging
import os
import threading

from ..core import policy

log = logging.getLogger(__name__)

# Errors that are answers, not storage failures: never held, never reported.
_NOT_FAILURES = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL, errno.ERANGE})


class Gate:
    """Requests share the gate; close() excludes them until reopened.

    The request side takes no lock: entering appends to a deque and leaving
    pops from it (each one atomic under the GIL), so the count of requests
    inside is len(deque).  A request appends *before* it looks at `closed`
    and a closer sets `closed` *before* it looks at the count, so one of
    them always sees the other: either the closer waits for the request, or
    the request backs out and waits for the gate to open.  Only the closed
    path (quiesce, QMP stop) uses the condition.
    """

    def __init__(self):
        self._inside = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = 0

    def enter(self):
        inside = self._inside
        while True:
            inside.append(None)
            if not self._closed:
                return
            inside.pop()
            with self._cond:
                self._cond.notify_all()          # a closer may be counting us
                while self._closed:
                    self._cond.wait()

    def leave(self):
        self._inside.pop()
        if self._closed:
            with self._cond:
                self._cond.notify_all()

    def close(self):
        """Stop new requests and wait for those in progress."""
        with self._cond:
            self._closed += 1
            while self._inside:
                self._cond.wait()

    def open(self):
        with self._cond:
            self._closed -= 1
            self._cond.notify_all()


class Disk:
    """The disk named `device`."""

    def __init__(self, store, device, bus=None, werror="report", rerror="report"):
        self.store = store
        self.device = device
        self.size = store.size
        self.bus = bus
        self.werror = werror
        self.rerror = rerror
        self._listeners = ()
        self._guards = ()
        self._marker = None
        self._lock = threading.Lock()
        self._gate = Gate()
        self._held = False
        self._io_cond = threading.Condition()
        self._io_status = "ok"
        self._io_generation = 0       # bumped by resume_io(): held requests retry
        self._held_requests = 0       # requests waiting in _io_error for cont
        self.bitmaps = None           # the disk's dirty bitmaps (bitmaps.py): a guard

    # -- listeners (jobs) -------------------------------------------------

    # Listeners and guards are tuples replaced whole under the lock, so the
    # request path reads them with no lock.

    def add_listener(self, fn):
        """Call fn(kind, offset, length, buf) after every completed change, and
        fn("failed", offset, length, None) after one that failed."""
        self._swap("_listeners", lambda fns: fns + (fn,))

    def remove_listener(self, fn):
        # Equality, not identity: a bound method (job._on_change) is a new
        # object each time it is looked up, but equal to the one added.
        self._swap("_listeners", lambda fns: tuple(f for f in fns if f != fn))

    def add_guard(self, guard):
        """Run guard.begin/persist before every change and guard.end after it."""
        self._swap("_guards", lambda guards: guards + (guard,))

    def remove_guard(self, guard):
        self._swap("_guards", lambda guards: tuple(g for g in guards if g is not guard))

    def set_marker(self, fn):
        """Run fn(offset, length) before every change (None: nothing)."""
        self._swap("_marker", lambda _: fn)

    def _swap(self, name, change):
        with self._lock:
            setattr(self, name, change(getattr(self, name)))

    # -- quiesce, hold, pivot --------------------------------------------

    @contextlib.contextmanager
    def quiesce(self):
        """No request runs inside this block."""
        self._gate.close()
        try:
            yield
        finally:
            self._gate.open()

    def hold(self):
        """QMP stop: hold client requests until release(); True if it was running."""
        with self._lock:
            if self._held:
                return False
            self._held = True
        self._gate.close()
        return True

    def release(self):
        with self._lock:
            if not self._held:
                return False
            self._held = False
        self._gate.open()
        return True

    @property
    def held(self):
        return self._held

    def pivot(self, new_store):
        """Serve new_store from now on (call inside quiesce()); returns the old store."""
        old, self.store = self.store, new_store
        log.info("Disk pivot device=%s to=%s", self.device, type(new_store).__name__)
        return old

    # -- guest-facing errors ----------------------------------------------

    @property
    def io_status(self):
        return self._io_status

    @property
    def held_requests(self):
        """How many client requests werror/rerror=stop holds until cont (query-block)."""
        return self._held_requests

    def _io_error(self, operation, e):
        """A request failed on the disk's own storage: report it, or hold it until cont.

        Returns when the request should be retried; raises the error for the client.
        """
        err = e.errno or errno.EIO
        if err in _NOT_FAILURES:
            raise e
        rule = self.werror if operation == "write" else self.rerror
        action = policy.error_action(rule, operation, err)
        if action != "stop":
            self._emit_io_error(operation, action, err)
            raise e
        with self._io_cond:
            if self._io_status == "ok":
                self._io_status = policy.io_status_for(err)
            generation = self._io_generation
            self._held_requests += 1
            self._emit_io_error(operation, action, err)
        log.warning("I/O error, request held device=%s operation=%s errno=%s error=%s",
                    self.device, operation, errno.errorcode.get(err, err), os.strerror(err))
        self._gate.leave()            # a held request must not block quiesce or stop
        try:
            with self._io_cond:
                try:
                    while self._io_generation == generation:
                        self._io_cond.wait()
                finally:
                    self._held_requests -= 1
        finally:
            self._gate.enter()

    def _emit_io_error(self, operation, action, err):
        if self.bus is not None:
            self.bus.emit("BLOCK_IO_ERROR", {
                "device": self.device, "node-name": self.device, "operation": operation,
                "action": action, "nospace": err == errno.ENOSPC, "reason": os.strerror(err)})

    def resume_io(self):
        """QMP cont: io-status back to ok, held requests retry."""
        with self._io_cond:
            self._io_status = "ok"
            self._io_generation += 1
            self._io_cond.notify_all()

    # -- NBD requests -----------------------------------------------------

    def _retry(self, operation, e, fn, args):
        """fn(*args) failed with e: retry it for as long as the error policy holds it.

        Off the fast path: a request that succeeds never enters here.
        """
        while True:
            self._io_error(operation, e)
            try:
                return fn(*args)
            except OSError as again:
                e = again

    def _change(self, kind, offset, length, buf, method, args):
        """A write, zero or trim through the gate, then the listeners (jobs).

        The store's method is looked up inside the gate: a request that waited
        at the gate while a mirror pivoted goes to the new store.
        """
        self._gate.enter()
        try:
            fn = getattr(self.store, method)
            marker = self._marker
            guards = self._guards
            if guards:
                self._guarded_change(guards, marker, kind, offset, length, buf, fn, args)
                return
            try:
                if marker is not None:
                    marker(offset, length)
                fn(*args)
            except OSError as e:
                self._retry_or_tell(e, ((), (), marker, offset, length, fn, args),
                                    offset, length)
            for listener in self._listeners:
                listener(kind, offset, length, buf)
        finally:
            self._gate.leave()

    def _retry_or_tell(self, e, call, offset, length):
        """_retry() a failed change (_persist_then(*call)); if it fails for good,
        tell the listeners (kind "failed", no data) before the error goes to the
        client: the store may have changed some of the bytes anyway (a write cut
        short by ENOSPC), so a job must copy the range from the disk, never the
        data."""
        try:
            self._retry("write", e, self._persist_then, call)
        except BaseException:
            for listener in self._listeners:
                try:
                    listener("failed", offset, length, None)
                except Exception:
                    log.exception("a listener failed on a failed change")
            raise

    def _guarded_change(self, guards, marker, kind, offset, length, buf, fn, args):
        # One guard (a mirror's intent log, or the bitmaps) is the common case:
        # no comprehension, no argument tuple on the way (a request in a mirror's
        # READY pays ~1 us less of Python, and holds the GIL that much less).
        if len(guards) == 1:
            tokens = (guards[0].begin(offset, length),)
        else:
            tokens = [g.begin(offset, length) for g in guards]
        try:
            try:
                if marker is not None:
                    marker(offset, length)
                for g, token in zip(guards, tokens):
                    g.persist(token)
                fn(*args)
            except OSError as e:
                self._retry_or_tell(e, (guards, tokens, marker, offset, length, fn, args),
                                    offset, length)
            for listener in self._listeners:
                listener(kind, offset, length, buf)
        finally:
            for g, token in zip(guards, tokens):
                g.end(token)

    @staticmethod
    def _persist_then(guards, tokens, marker, offset, length, fn, args):
        """Mark, persist the guards, then change (again for each retry of a held one).
        _guarded_change makes the first try inline, in the same order."""
        if marker is not None:
            marker(offset, length)
        for g, token in zip(guards, tokens):
            g.persist(token)
        fn(*args)

    def read(self, buf, offset):
        self._gate.enter()
        try:
            try:
                self.store.read(buf, offset)
            except OSError as e:
                self._retry("read", e, self.store.read, (buf, offset))
        finally:
            self._gate.leave()

    def write(self, buf, offset, fua=False):
        self._change("write", offset, len(buf), buf, "write", (buf, offset, fua))

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        self._change("zero", offset, length, None, "zero",
                     (offset, length, may_trim, fast, fua))

    def trim(self, offset, length, fua=False):
        self._change("trim", offset, length, None, "trim", (offset, length, fua))

    def flush(self):
        self._gate.enter()
        try:
            try:
                self.store.flush()
            except OSError as e:
                self._retry("write", e, self.store.flush, ())
        finally:
            self._gate.leave()
        if self.bitmaps is not None:
            self.bitmaps.flushed()

    def extents(self, offset, length, req_one=False):
        self._gate.enter()
        try:
            try:
                return self.store.extents(offset, length, req_one)
            except OSError as e:
                return self._retry("read", e, self.store.extents, (offset, length, req_one))
        finally:
            self._gate.leave()

    def cache(self, offset, length):
        self._gate.enter()
        try:
            self.store.cache(offset, length)
        finally:
            self._gate.leave()

    def close(self):
        self.store.close()
