"""When a mirror retries copies that failed under the ``ignore`` policy.

A persistent fault must not make the job spin, and one bad range must not
hold back the rest of the disk.  So two clocks, both doubling from
``first`` up to ``maximum`` seconds:

* per range: a range whose copy failed is kept out of the dirty bitmap
  until its retry time; each further failure of (part of) it doubles its
  delay, a success forgets it.  Delays are remembered per ``key_size``
  bytes (the mirror's largest copy), so the memory is bounded by the disk
  size and a retried range finds its history even if it is split or merged
  with neighbours on the way.
* a gate for the whole job: after a failed batch no new copy starts before
  ``gate``.  The gate delay doubles while nothing succeeds between failed
  batches (a dead target: a few requests every few seconds, not thousands)
  and falls back to ``first`` once something succeeds (one bad range among
  good ones).

Only the job thread uses a RetrySchedule; it is not thread safe.
"""

import heapq
import time

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0


class RetrySchedule:
    def __init__(self, key_size, first=BACKOFF_FIRST, maximum=BACKOFF_MAX, clock=time.monotonic):
        if key_size <= 0:
            raise ValueError("key_size must be positive")
        self.key_size = key_size
        self.first = first
        self.maximum = maximum
        self._clock = clock
        self._delays = {}          # offset // key_size -> last delay of a range there
        self._waiting = []         # heap of (due, offset, length)
        self._bytes = 0
        self._gate_delay = 0.0
        self._succeeded = True     # something succeeded since the last failed batch
        self.gate = 0.0            # clock time before which no new copy starts

    def _keys(self, offset, length):
        return range(offset // self.key_size, (offset + max(length, 1) - 1) // self.key_size + 1)

    def _next_delay(self, previous):
        return min(self.maximum, max(self.first, previous * 2))

    def defer(self, offset, length):
        """Hold a failed range back; returns its delay in seconds."""
        keys = self._keys(offset, length)
        delay = self._next_delay(max(self._delays.get(k, 0.0) for k in keys))
        for k in keys:
            self._delays[k] = delay
        heapq.heappush(self._waiting, (self._clock() + delay, offset, length))
        self._bytes += length
        return delay

    def failed_batch(self):
        """A batch of requests failed: close the gate for a while; returns the delay."""
        self._gate_delay = self.first if self._succeeded else self._next_delay(self._gate_delay)
        self._succeeded = False
        self.gate = self._clock() + self._gate_delay
        return self._gate_delay

    def succeeded(self, offset, length):
        """A copy of [offset, offset+length) succeeded: forget its failures."""
        self._succeeded = True
        if self._delays:
            for k in self._keys(offset, length):
                self._delays.pop(k, None)

    def gate_open(self):
        return self._clock() >= self.gate

    def due(self):
        """Pop the ranges whose retry time has come: [(offset, length)]."""
        now = self._clock()
        ready = []
        while self._waiting and self._waiting[0][0] <= now:
            _, offset, length = heapq.heappop(self._waiting)
            self._bytes -= length
            ready.append((offset, length))
        return ready

    def drain(self):
        """Pop every waiting range, due or not (the final copy takes them all)."""
        ready = [(offset, length) for _, offset, length in self._waiting]
        self._waiting = []
        self._bytes = 0
        return ready

    def ranges(self):
        """(offset, length) of every waiting range, due or not."""
        return [(offset, length) for _, offset, length in self._waiting]

    def next_due(self):
        """Clock time of the earliest waiting range, or None."""
        return self._waiting[0][0] if self._waiting else None

    @property
    def waiting_bytes(self):
        return self._bytes

    def __bool__(self):
        return bool(self._waiting)
