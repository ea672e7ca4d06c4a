"""The mirror job (drive-mirror): copy the served disk to a target while it is in use.

Phases, as QEMU's block/mirror.c:

1. Initial dirty set by sync mode: full (everything that does not read as
   zeros; zero ranges are zeroed on the target unless it reads as zeros
   already), top (what the overlay holds), none (nothing).  Client writes are
   tracked from the start by a dirty bitmap (a disk listener).
2. Copy loop: take a dirty run (at most `chunk` bytes), clear it, read the
   source, write or zero the target asynchronously, up to `buf-size` bytes in
   flight.  A write that lands after the read re-marks the run dirty.
3. Nothing dirty and nothing in flight: flush the target, READY.  Keep copying
   new writes.
4. complete (or a soft cancel): prepare() closes the disk's gate (no client
   request runs), copies what is left, flushes the target, and on complete
   pivots the disk to the target.

copy-mode=write-blocking: client writes are also written to the target
synchronously (a second connection), so the job converges under any write
load.  Background copies and write-throughs of overlapping ranges exclude each
other with a range lock, so an older background copy never lands after a newer
write-through.

Every I/O error goes through Job.report_io_error (the one decision point):
report ends the job, ignore re-marks the range dirty and backs off, stop
pauses the job; after resume the range is retried.
"""

import errno
import logging
import os
import time

from plugin import backends
from plugin.aio_target import MAX_ZERO, open_target
from plugin.bitmap import DirtyBitmap
from plugin.clustermap import ABSENT
from plugin.job import Job
from plugin.qmp_commands import QMPError
from plugin.store import RangeLock

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_BUF_SIZE = 16 * MiB
MAX_CHUNK = 1 * MiB
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
IDLE_WAIT = 0.5


class _Op:
    """One copy of [offset, offset+length) in flight, perhaps several target requests."""

    __slots__ = ("offset", "length", "token", "remaining", "error", "first", "end")

    def __init__(self, offset, length, token):
        self.offset, self.length, self.token = offset, length, token
        self.remaining = 0
        self.error = 0


class MirrorJob(Job):
    soft_cancel_when_ready = True
    changeable_options = frozenset({"copy_mode", "on_source_error", "on_target_error"})

    def __init__(self, job_id, bus, disk, target, sync="full", granularity=None,
                 buf_size=None, speed=0, on_source_error="report", on_target_error="report",
                 copy_mode="background", auto_finalize=True, auto_dismiss=True, pivot=None):
        super().__init__(job_id, "mirror", bus, device=disk.device, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.disk = disk
        self.target_address = target
        self.sync = sync
        self.granularity = granularity or disk.store.cluster_size
        self.chunk = max(self.granularity, MAX_CHUNK)
        self.max_in_flight = max(1, (buf_size or DEFAULT_BUF_SIZE) // self.chunk)
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.copy_mode = copy_mode
        self._pivot = pivot
        self.target = open_target(target)
        if self.target.size() != disk.size:
            self.target.close()
            raise QMPError("Source and target image have different sizes")
        self.bitmap = DirtyBitmap(disk.size, self.granularity)
        self._ranges = RangeLock()
        self._through = None          # synchronous target connection for write-blocking
        self._zero_queue = []         # (offset, length) to zero on the target first
        self._ops = set()             # copies in flight
        self._copied = 0
        self._in_flight_bytes = 0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._fatal = None
        self._listening = False
        self.set_progress(0, 0)

    # -- policies (block-job-change) ---------------------------------------

    def change(self, copy_mode=None, on_source_error=None, on_target_error=None):
        if copy_mode is not None:
            if self.copy_mode == "write-blocking" and copy_mode == "background":
                raise QMPError("Cannot change copy-mode from 'write-blocking' to 'background'")
            self.copy_mode = copy_mode
        if on_source_error is not None:
            self.on_source_error = on_source_error
        if on_target_error is not None:
            self.on_target_error = on_target_error
        log.info("Mirror changed id=%s copy_mode=%s on_source_error=%s on_target_error=%s",
                 self.id, self.copy_mode, self.on_source_error, self.on_target_error)

    # -- client writes -------------------------------------------------------

    def _on_change(self, kind, offset, length, buf):
        """Disk listener: runs in the client's thread after its change completed."""
        if self.copy_mode == "write-blocking" and self._fatal is None and not self.user_paused:
            try:
                self._write_through(kind, offset, length, buf)
                return
            except OSError as e:
                log.warning("Mirror write-through failed id=%s offset=%d length=%d error=%s",
                            self.id, offset, length, e)
                self.bitmap.mark(offset, length)
                self._client_side_error(e.errno or errno.EIO)
                self.kick()
                return
        if self.bitmap.mark(offset, length):
            self.kick()

    def _write_through(self, kind, offset, length, buf):
        g = self.granularity
        token = self._ranges.acquire(offset // g, (offset + length + g - 1) // g)
        try:
            if self._through is None:
                self._through = backends.open_backend(self.target_address, readonly=False)
            if kind == "write":
                self._through.write(buf, offset)
            else:
                self._through.zero(offset, length, may_trim=(kind == "trim"))
        finally:
            self._ranges.release(token)

    def _client_side_error(self, err):
        action = self.report_io_error("write", err, self.on_target_error)
        if action == "report" and self._fatal is None:
            self._fatal = OSError(err, os.strerror(err))

    # -- the job thread -------------------------------------------------------

    def run(self):
        self.disk.add_listener(self._on_change)
        self._listening = True
        self._initial_dirty()
        pos = 0
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self.pause_point():
                return
            self._update_progress()
            pos = self._issue_some(pos)
            if self.cancelled:
                return
            if self.target.in_flight():
                self._reap(self.target.wait(0.1))
                continue
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                self.sleep(delay)
                continue
            if self._zero_queue or not self.bitmap.is_clean():
                continue
            if not self.is_ready:
                if not self._flush_target():
                    continue
                self._update_progress()
                self.transition_to_ready()
            if self.should_complete or self.cancel_requested:
                return
            self.sleep(IDLE_WAIT)

    def _initial_dirty(self):
        store = self.disk.store
        if self.sync == "none":
            return
        target_zero = all(zero for _, _, zero in self.target.extents(0, self.disk.size))
        if self.sync == "top" and getattr(store, "base", None) is not None:
            cs = store.cluster_size
            c, end = 0, store.nclusters
            while c < end:
                run_end = store.map.run_end(c, end)
                if store.map.get(c) != ABSENT:
                    self.bitmap.mark(c * cs, min(run_end * cs, store.size) - c * cs)
                c = run_end
            return
        pos = 0
        while pos < self.disk.size:
            for off, length, kind in store.extents(pos, self.disk.size - pos):
                if not kind & 2:
                    self.bitmap.mark(off, length)
                elif not target_zero:
                    self._zero_queue.append((off, length))
                pos = off + length

    def _update_progress(self):
        remaining = self.bitmap.dirty_bytes() + self._in_flight_bytes
        remaining += sum(n for _, n in self._zero_queue)
        self.set_progress(self._copied, self._copied + remaining)

    def _issue_some(self, pos):
        """Start copies until buf-size is in flight or nothing is dirty; returns the cursor."""
        while self.target.in_flight() < self.max_in_flight:
            if self._retry_at > time.monotonic():
                break
            if self._zero_queue:
                off, length = self._zero_queue.pop()
                n = min(length, MAX_ZERO)
                if n < length:
                    self._zero_queue.append((off + n, length - n))
                if not self._start_op(off, n, zero=True):
                    break
                continue
            run = self.bitmap.take(pos, self.chunk)
            if run is None:
                break
            off, n = run
            pos = off + n
            if not self._start_op(off, n):
                break
            if self.throttle(n):
                break
        return pos

    def _start_op(self, offset, length, zero=False, on_error=None):
        """Read the source and submit target requests for one range; False on a read error."""
        g = self.granularity
        first, end = offset // g, (offset + length + g - 1) // g
        if any(o.first < end and first < o.end for o in self._ops):
            # A copy of these granules is in flight: a second one could land
            # before it on the target.  Retry once it has completed.
            if zero:
                self._zero_queue.append((offset, length))
            else:
                self.bitmap.mark(offset, length)
            return False
        op = _Op(offset, length, self._ranges.acquire(first, end))
        op.first, op.end = first, end
        store = self.disk.store
        requests = []
        try:
            if zero:
                requests.append((offset, length, None))
            else:
                pos, stop = offset, offset + length
                while pos < stop:
                    for o, n, kind in store.extents(pos, stop - pos):
                        if kind & 2:
                            requests.append((o, n, None))
                        else:
                            buf = bytearray(n)
                            store.read(buf, o)
                            requests.append((o, n, buf))
                        pos = o + n
        except OSError as e:
            self._ranges.release(op.token)
            self.bitmap.mark(offset, length)
            (on_error or self._handle_error)("read", e.errno or errno.EIO)
            return False
        op.remaining = len(requests)
        if not requests:
            self._ranges.release(op.token)
            return True
        self._ops.add(op)
        self._in_flight_bytes += length
        for o, n, buf in requests:
            if buf is None:
                self.target.submit_zero(o, n, op)
            else:
                self.target.submit_write(buf, o, op)
        return True

    def _reap(self, completions, on_error=None):
        for op, err in completions:
            if err and not op.error:
                op.error = err
            op.remaining -= 1
            if op.remaining:
                continue
            self._ranges.release(op.token)
            self._ops.discard(op)
            self._in_flight_bytes -= op.length
            if op.error:
                self.bitmap.mark(op.offset, op.length)
                (on_error or self._handle_error)("write", op.error)
            else:
                self._copied += op.length
                self._backoff = 0.0

    def _flush_target(self):
        try:
            self.target.flush()
            return True
        except OSError as e:
            self._handle_error("write", e.errno or errno.EIO)
            return False

    def _handle_error(self, operation, err):
        """Apply the policy for a failed read (source) or write (target)."""
        policy = self.on_source_error if operation == "read" else self.on_target_error
        action = self.report_io_error(operation, err, policy)
        if action == "report":
            raise OSError(err, os.strerror(err))
        if action == "ignore":
            # Persistent faults must not spin: back off, up to BACKOFF_MAX.
            self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
        if operation == "write":
            self._reconnect_target()

    def _reconnect_target(self):
        try:
            self.target.reconnect()
        except OSError as e:
            log.warning("Mirror target reconnect failed id=%s error=%s", self.id, e)

    # -- completion --------------------------------------------------------

    def prepare(self):
        """Final sync with no client request running; pivot on complete.

        Any error here fails the job (no pivot): the disk is quiesced, so
        pausing or retrying would hold the clients' I/O.
        """
        while self.target.in_flight():
            self._reap(self.target.wait(1.0), on_error=_fail)
        with self.disk.quiesce():
            self._stop_listening()
            pos = 0
            while self._zero_queue or not self.bitmap.is_clean() or self.target.in_flight():
                while self.target.in_flight() < self.max_in_flight:
                    if self._zero_queue:
                        off, n = self._zero_queue.pop()
                        if not self._start_op(off, n, zero=True, on_error=_fail):
                            break
                        continue
                    run = self.bitmap.take(pos, self.chunk)
                    if run is None:
                        break
                    pos = run[0] + run[1]
                    if not self._start_op(*run, on_error=_fail):
                        break
                self._reap(self.target.wait(1.0), on_error=_fail)
            self._update_progress()
            self.target.flush()
            if self.should_complete and self._pivot is not None:
                self._pivot(self.target_address)
        log.info("Mirror finished id=%s pivot=%s copied=%d", self.id, self.should_complete,
                 self._copied)

    def _stop_listening(self):
        if self._listening:
            self.disk.remove_listener(self._on_change)
            self._listening = False

    def abort(self):
        self._stop_listening()

    def clean(self):
        self._stop_listening()
        self.target.close()
        if self._through is not None:
            self._through.close()
            self._through = None


def _fail(operation, err):
    raise OSError(err, os.strerror(err))
