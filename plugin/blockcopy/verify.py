"""A restored mirror's comparison of what it had copied before a crash.

The intent log marks COPIED the regions whose copies the target answered but
no flush has covered yet (plugin/blockcopy/intent.py).  After a crash the target
may or may not still hold them (its own crash would lose them), so they are
compared, target against disk, instead of being copied blindly: equal ranges
are in sync once a flush completes, every other range is copied.

The Verifier runs in a helper thread with a reader of its own (a second NBD
connection: Target.open_reader()), so the comparison overlaps the job
thread's copy of the regions that were never copied.  When that copy is
done first, the job stops the comparison and copies what it had not
reached: comparing saves target writes, and never delays READY.  It only ever *adds*
work: a range it finds different, or cannot read, goes to `different`; the
job thread marks those dirty.  A client change meanwhile is the dirty
bitmap's business (the listener), whatever the comparison found.

Threads: the helper thread runs _run(); the job thread calls take_different(),
remaining(), stalled() and stop().  `different` is a deque (append/popleft
are atomic); the counters are only written by the helper.
"""

import collections
import logging
import threading
import time

from ..backends import CONNECT_TIMEOUT
from ..core.threads import Thread

log = logging.getLogger(__name__)


class Verifier:
    """Compare ranges of store (the disk) with reader (the target), chunk by chunk."""

    def __init__(self, store, reader, ranges, chunk, job_id, clock=time.monotonic):
        self._store = store
        self._reader = reader
        self.ranges = list(ranges)            # what it compares (busy until done)
        self._chunk = chunk
        self._job_id = job_id
        self._clock = clock
        self.different = collections.deque()  # (offset, length) to copy
        self.equal_bytes = 0
        self.different_bytes = 0
        self._total = sum(n for _, n in self.ranges)
        self.done = False
        self.progress_at = clock()
        self.started_at = clock()
        self._stopping = threading.Event()
        self._started = False
        self._thread = Thread(target=self._run, name="mirror-verify", daemon=True)

    def start(self):
        self._thread.start()
        self._started = True

    def _run(self):
        rest = collections.deque(self.ranges)
        try:
            while rest:
                off, n = rest.popleft()
                length = min(n, self._chunk)
                if length < n:
                    rest.appendleft((off + length, n - length))
                if self._stopping.is_set():
                    rest.appendleft((off, length))
                    break
                try:
                    source = bytearray(length)
                    self._store.read(source, off)
                    target = self._reader.read(length, off)
                except OSError as e:
                    if not self._stopping.is_set():
                        log.warning("Mirror verify failed job=%s offset=%d error=%s: copying "
                                    "the rest instead", self._job_id, off, e)
                    rest.appendleft((off, length))
                    break
                if source == target:
                    self.equal_bytes += length
                else:
                    self.different.append((off, length))
                    self.different_bytes += length
                self.progress_at = self._clock()
        except Exception:
            log.exception("Mirror verify failed job=%s: copying the rest instead", self._job_id)
        finally:
            for off, n in rest:               # not compared: copied
                self.different.append((off, n))
                self.different_bytes += n
            self._reader.close()
            self.done = True

    def take_different(self):
        """[(offset, length)] found different (or not compared) since the last call."""
        taken = []
        while self.different:
            taken.append(self.different.popleft())
        return taken

    def remaining(self):
        """Bytes not yet decided (for the job's progress)."""
        if self.done:
            return 0
        return max(0, self._total - self.equal_bytes - self.different_bytes)

    def stalled(self, timeout):
        return not self.done and self._clock() - self.progress_at > timeout

    def stop(self, timeout=2.0):
        """Give up: what is not compared yet is copied.  Waits up to timeout."""
        self._stopping.set()
        self._reader.interrupt()
        if not self._started:
            for off, n in self.ranges:
                self.different.append((off, n))
                self.different_bytes += n
            self._reader.close()
            self.done = True
        elif self._thread.is_alive():
            self._thread.join(timeout)


class Comparison:
    """A restored job's comparison of its COPIED regions, from the job thread.

    `pending` holds the ranges to compare (the job may trust them instead:
    link.TargetTrust); :meth:`start` hands them to a Verifier on a reader of
    the target's own, :meth:`collect` marks dirty (mark(offset, length))
    what it found different, :meth:`stop` gives up and marks the rest.
    """

    def __init__(self, store, chunk, job_id, clock, mark, kind="Mirror"):
        self._store, self._chunk, self._job_id = store, chunk, job_id
        self._clock, self._mark, self._kind = clock, mark, kind
        self.pending = collections.deque()    # (offset, length) to compare
        self.verifier = None

    @property
    def running(self):
        return self.verifier is not None

    def held_ranges(self):
        return self.verifier.ranges if self.verifier is not None else ()

    def remaining(self):
        return self.verifier.remaining() if self.verifier is not None else 0

    def start(self, target):
        """Compare the pending ranges with the target in a helper thread while the
        job thread copies the rest; a target with no reader: copy them."""
        ranges, self.pending = list(self.pending), collections.deque()
        open_reader = getattr(target, "open_reader", None)
        reader = None
        if open_reader is not None:
            try:
                reader = open_reader()
            except OSError as e:
                log.warning("%s cannot compare job=%s error=%s: copying instead", self._kind,
                            self._job_id, e)
        if reader is None:
            for off, n in ranges:
                self._mark(off, n)
            return
        self.verifier = Verifier(self._store, reader, ranges, self._chunk, self._job_id,
                                 clock=self._clock)
        self.verifier.start()

    def collect(self, stall_timeout=CONNECT_TIMEOUT):
        """Mark dirty what the comparison found different; log when it is done."""
        v = self.verifier
        done = v.done                 # read first: everything found before it is drained
        for off, n in v.take_different():
            self._mark(off, n)
        if done:
            self.verifier = None
            log.info("%s verified job=%s equal=%d different=%d bytes seconds=%.3f", self._kind,
                     self._job_id, v.equal_bytes, v.different_bytes,
                     self._clock() - v.started_at)
        elif v.stalled(stall_timeout):
            log.warning("%s verify stalled job=%s: copying the rest instead", self._kind,
                        self._job_id)
            v.stop()

    def stop(self, stall_timeout=CONNECT_TIMEOUT):
        if self.verifier is not None:
            self.verifier.stop()
            self.collect(stall_timeout)
