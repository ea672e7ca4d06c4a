"""The copy pipeline: dirty ranges in; source reads, target writes and zeroes out.

What every copying job (mirror, backup, commit) does between "this range
must be copied" and "the target answered": take a dirty run of at most
`chunk` bytes from the bitmap (clearing it), read the source (the disk's
store, zero runs found from its extents), submit writes and zeroes to the
target asynchronously, up to `max_in_flight` copies at once, and collect
the answers.  A change that lands after the read re-marks the run dirty
(the job's listener), so a run is never lost between take and answer.

The pipeline owns its state: the dirty bitmap, the zero queue (ranges
zeroed on the target first), the copies in flight (:class:`CopyOp`, with
their granules held in a range lock so two copies of the same granules
never race on the target), the buffer pool, the retry schedule of ranges
that failed under `ignore` (backoff.py) and the failures not yet handled.
It decides nothing about errors: a failed read or write is recorded as a
:class:`Failure`, and the job applies its policy (Job.report_io_error, the
one decision point) to them.  Flush completions are handed to `on_flush`
(flushes.py); every copy the target answered to `on_copied`.

Only the job thread calls the pipeline (client threads only mark the
bitmap, which is thread safe).
"""

import collections
import logging

from ..backends import MAX_ZERO
from ..core.bitmap import DirtyBitmap
from ..core.errors import errno_name, errno_of
from ..disk.rangelock import RangeLock
from .backoff import RetrySchedule

log = logging.getLogger(__name__)

# One failed request: operation "read" (source) or "write" (target); a flush
# has length 0 (no range to copy again).
Failure = collections.namedtuple("Failure", "operation errno offset length detail")


class CopyOp:
    """One copy of [offset, offset+length) in flight, perhaps several target requests."""

    __slots__ = ("offset", "length", "token", "remaining", "error", "first", "end", "buf",
                 "data")

    def __init__(self, offset, length, token):
        self.offset, self.length, self.token = offset, length, token
        self.remaining = 0
        self.error = 0
        self.buf = None
        self.data = 0             # bytes written (not zeroed) by this copy


class CopyPipeline:
    def __init__(self, store, size, granularity, chunk, max_in_flight, clock, job_id,
                 kind="Mirror"):
        self.store = store
        self.size = size
        self.granularity = granularity
        self.chunk = chunk
        self.max_in_flight = max_in_flight
        self.clock = clock                # now() -> seconds
        self.job_id = job_id
        self.kind = kind                  # for the log: "Mirror", "Backup", ...
        self.bitmap = DirtyBitmap(size, granularity)
        self.zero_queue = []              # (offset, length) to zero on the target first
        self.ops = set()                  # copies in flight
        self.failures = []                # Failure records not yet handled
        self.ranges = RangeLock()         # granules of copies (and write-throughs) in flight
        self.retries = RetrySchedule(chunk, clock=clock)
        self.copied = 0                   # bytes copied (progress)
        self.written = 0                  # bytes of data written (x-copied-bytes)
        self.in_flight_bytes = 0
        self.last_answer = 0.0            # when the target last completed a request
        self.mark_window = [size, 0]      # bytes the copies answered since the last mark
        self.target = None                # set by the job once connected
        self.target_name = ""
        self.blocked = lambda first, end: False   # another writer may still land there
        self.skip_zero = False            # the target reads as zeros: zero ranges need nothing
        self.copy_mask = None             # (offset, length) -> the sub-ranges to copy again
        self.on_flush = None              # (flush tag, errno) of a completed flush
        self.on_copied = None             # (offset, length) the target answered
        # fn() before a copy's requests go to the target, after its reads (the
        # intent log's sync_owed: a set it deferred is durable before the target
        # can hold the change); an OSError fails the copy as a read.
        self.before_send = None
        self._buffers = []                # free copy buffers of `chunk` bytes
        self._unpaid = 0                  # bytes copied but not yet paid to the rate limiter

    def use_target(self, target):
        """The target object the copies go to (a reconnect may make a new one)."""
        self.target = target

    # -- what to copy ----------------------------------------------------------

    def mark_initial(self, sync, target_reads_zero):
        """The first dirty set by sync mode: "full" everything that does not read as
        zeros (zero ranges are zeroed on the target unless it reads as zeros
        already), "top" what the overlay holds, "none" nothing."""
        store = self.store
        if sync == "none":
            return
        if sync == "top" and store.has_base:
            for off, length in store.overlay_runs():
                self.bitmap.mark(off, length)
            return
        target_zero = target_reads_zero()
        pos = 0
        while pos < self.size:
            for e in store.extents(pos, self.size - pos):
                if not e.zero:
                    self.bitmap.mark(e.offset, e.length)
                elif not target_zero:
                    self.zero_queue.append((e.offset, e.length))
                pos = e.end

    def pending(self):
        """Something is left to copy (dirty or queued zeroes)."""
        return bool(self.zero_queue) or not self.bitmap.is_clean()

    def remaining(self):
        """Bytes still to copy: dirty, in flight, queued zeroes, waiting for a retry."""
        return (self.bitmap.dirty_bytes() + self.in_flight_bytes
                + sum(n for _, n in self.zero_queue) + self.retries.waiting_bytes)

    def held_ranges(self):
        """Ranges the pipeline holds that the bitmap does not show: in flight,
        queued zeroes, waiting for a retry, failed and not yet handled."""
        ranges = [(o.offset, o.length) for o in self.ops]
        ranges += self.zero_queue
        ranges += self.retries.ranges()
        ranges += [(f.offset, f.length) for f in self.failures if f.length]
        return ranges

    def copy_again(self, lost):
        """Mark every range of the bitmap `lost` dirty again (its copies may be lost)."""
        count = 0
        run = lost.take(0, self.size)
        while run is not None:
            for off, n in ([run] if self.copy_mask is None else self.copy_mask(*run)):
                self.bitmap.mark(off, n)
                count += n
            run = lost.take(0, self.size)
        if count:
            self.copied -= min(self.copied, count)
            log.info("%s copies again what the target may have lost job=%s bytes=%d",
                     self.kind, self.job_id, count)

    def take_failures(self):
        failures, self.failures = self.failures, []
        return failures

    # -- issuing copies ----------------------------------------------------------

    def issue(self, pos, final=False, speed=0, throttle=None):
        """Start copies until max_in_flight or nothing is dirty; returns the cursor.

        With a speed limit, one copy at a time: the target is only driven
        while the job thread polls it, so a copy must not sit unsent while
        the rate limiter sleeps.  The copy is paid for (throttle(bytes) ->
        True if the job was cancelled meanwhile) before the next one.
        final: the last copy of a job's prepare(), with clients quiesced:
        no speed limit and no retry gate hold it back.
        """
        target = self.target
        while target.in_flight() < self.max_in_flight and not self.failures:
            if not final and not self.retries.gate_open():
                break
            if self.zero_queue:
                off, length = self.zero_queue.pop()
                n = min(length, MAX_ZERO)
                if n < length:
                    self.zero_queue.append((off + n, length - n))
                if not self._start(off, n, zero=True):
                    break
                continue
            if not final and (speed or self._unpaid):
                if target.in_flight():
                    break
                unpaid, self._unpaid = self._unpaid, 0
                if unpaid and throttle(unpaid):
                    break
            run = self.bitmap.take_part(pos, self.chunk)
            if run is None:
                break
            off, n, part_off, part_n = run
            pos = off + n
            if not self._start(off, n, part=(part_off, part_n)):
                break
            if speed and not final:
                self._unpaid = n
                break
        return pos

    def _start(self, offset, length, zero=False, part=None):
        """Read the source and submit target requests for one range.

        part: (offset, length) within the range, the only bytes that changed
        since its granules were last clean (DirtyBitmap.take_part): only they
        are read and sent; the copy still stands for the whole range (its
        lock, progress, flush and retry cover the granules).
        False if nothing was started: a copy of the same granules is in
        flight, or the read failed (recorded in failures).
        """
        g = self.granularity
        first, end = offset // g, (offset + length + g - 1) // g
        blocked = self.blocked(first, end)
        token = None if blocked else self.ranges.try_acquire(first, end)
        if token is None and (blocked or any(o.first < end and first < o.end for o in self.ops)):
            # A copy of these granules is in flight: a second one could land
            # before it on the target.  Retry once it has completed.
            if zero:
                self.zero_queue.append((offset, length))
            elif part is not None:
                self.bitmap.mark_part(*part)
            else:
                self.bitmap.mark(offset, length)
            return False
        if token is None:
            # A client holds them (a copy before write, a write-through): wait for it.
            token = self.ranges.acquire(first, end)
        op = CopyOp(offset, length, token)
        op.first, op.end = first, end
        store = self.store
        requests = []
        # File to file (a file target, overlay data in data.img at the same
        # offsets): the kernel copies (copy_file_range), no bytes through Python.
        data_file = (getattr(store, "data_file", None)
                     if hasattr(self.target, "submit_copy") else None)
        try:
            if zero:
                requests.append((offset, length, None))
            else:
                pos, stop = part if part is not None else (offset, length)
                stop += pos
                while pos < stop:
                    for e in store.extents(pos, stop - pos):
                        if e.zero:
                            if not self.skip_zero:
                                requests.append((e.offset, e.length, None))
                        else:
                            fd = data_file(e.offset, e.length) if data_file else None
                            if fd is not None:
                                requests.append((e.offset, e.length, fd))
                                pos = e.end
                                continue
                            if op.buf is None:
                                op.buf = self._take_buffer(length)
                            piece = memoryview(op.buf)[e.offset - offset:e.end - offset]
                            store.read(piece, e.offset)
                            requests.append((e.offset, e.length, piece))
                        pos = e.end
            if requests and self.before_send is not None:
                self.before_send()
        except OSError as e:
            self._give_buffer(op)
            self.ranges.release(op.token)
            log.warning("%s read failed job=%s offset=%d length=%d error=%s",
                        self.kind, self.job_id, offset, length, e)
            self.failures.append(Failure("read", errno_of(e), offset, length, str(e)))
            return False
        op.remaining = len(requests)
        op.data = sum(n for _, n, buf in requests if buf is not None)
        if not requests:
            # Nothing to send (zero ranges of a target that reads as zeros):
            # copied as soon as it was looked at.
            self._give_buffer(op)
            self.ranges.release(op.token)
            self.copied += length
            self.retries.succeeded(offset, length)
            self.on_copied(offset, length)
            return True
        self.ops.add(op)
        self.in_flight_bytes += length
        target = self.target
        for o, n, buf in requests:
            if buf is None:
                target.submit_zero(o, n, op)
            elif isinstance(buf, int):
                target.submit_copy(buf, o, n, op)
            else:
                target.submit_write(buf, o, op)
        return True

    def _take_buffer(self, length):
        """A copy buffer from the pool: reused memory is already mapped and faulted in,
        which makes a 1 GiB copy several times cheaper than fresh bytearrays."""
        if length <= self.chunk and self._buffers:
            return self._buffers.pop()
        return bytearray(max(length, self.chunk))

    def _give_buffer(self, op):
        if op.buf is not None and len(op.buf) == self.chunk:
            self._buffers.append(op.buf)
        op.buf = None

    # -- answers -------------------------------------------------------------------

    def reap(self, completions):
        """Account for the target's answers [(tag, errno)]; flushes go to on_flush."""
        if completions:
            self.last_answer = self.clock()
        for op, err in completions:
            if not isinstance(op, CopyOp):
                self.on_flush(op, err)
                continue
            if err and not op.error:
                op.error = err
            op.remaining -= 1
            if op.remaining:
                continue
            self.ranges.release(op.token)
            self.ops.discard(op)
            self._give_buffer(op)
            self.in_flight_bytes -= op.length
            if op.error:
                log.warning("%s write failed job=%s offset=%d length=%d errno=%s",
                            self.kind, self.job_id, op.offset, op.length, errno_name(op.error))
                self.failures.append(Failure("write", op.error, op.offset, op.length,
                                             "write to %s" % self.target_name))
            else:
                self.copied += op.length
                self.written += op.data
                window = self.mark_window
                if op.offset < window[0]:
                    window[0] = op.offset
                if op.offset + op.length > window[1]:
                    window[1] = op.offset + op.length
                self.retries.succeeded(op.offset, op.length)
                self.on_copied(op.offset, op.length)
        return bool(completions)

    def abandon(self):
        """The job ends with copies still in flight (cancelled, failed): let go of
        their granules, so nothing waits for answers no one will collect."""
        for op in list(self.ops):
            self.ranges.release(op.token)
            self._give_buffer(op)
        self.ops.clear()
        self.in_flight_bytes = 0

    def drain(self, cancelled):
        """Wait for every request in flight; False if cancelled() first."""
        target = self.target
        while target.in_flight():
            if cancelled():
                return False
            self.reap(target.wait(0.1))
        return True
