"""How often a copying job makes its progress durable: after an interval, or after
a fraction of the disk was copied, whichever comes first.

The mirror's checkpoints (flushes.py) and the stream's (jobs/stream.py) both
follow it, so a job killed half way copies about the other half again, and a
fast copy does not wait a whole interval between checkpoints.
"""

MiB = 1 << 20


class Cadence:
    def __init__(self, size, clock, interval=1.0, fraction=32, min_bytes=1 * MiB):
        self._clock = clock
        self.interval = interval
        self.bytes = max(min_bytes, size // fraction)
        self._copied_at = 0
        self._at = clock()

    def due(self, copied, idle=False):
        """True if `copied` (bytes so far) is past the last mark by the byte step,
        or the interval has passed since it (and something was copied, unless
        idle: the stream also saves the progress of what it skipped)."""
        since = copied - self._copied_at
        if since <= 0 and not idle:
            return False
        return since >= self.bytes or self._clock() - self._at >= self.interval

    def mark(self, copied):
        """A checkpoint begins now, covering `copied` bytes."""
        self._copied_at = copied
        self._at = self._clock()
