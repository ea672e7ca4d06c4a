"""A job's speed limit: bytes per second with a little slack, as QEMU's ratelimit.

Work is paid for after it is done (``account``); ``delay`` says how long the
job must wait before its next piece of work.  A job may run ahead of its speed
by SLICE seconds' worth of bytes (QEMU's BLOCK_JOB_SLICE_TIME), so small
requests are not delayed.  Not thread safe: the engine calls it under its lock.
"""

SLICE = 0.1


class RateLimiter:
    def __init__(self, speed: int, now: float, slice_time: float = SLICE):
        self.speed = speed
        self._slice = slice_time
        self._debt = 0.0          # bytes done beyond what speed allowed so far
        self._last = now

    def settle(self, now: float) -> None:
        """Pay off the debt for the time elapsed at the current speed."""
        if self.speed:
            self._debt = max(0.0, self._debt - (now - self._last) * self.speed)
        else:
            self._debt = 0.0
        self._last = now

    def set_speed(self, speed: int, now: float) -> None:
        """Change the speed; what was done so far is paid at the old one."""
        self.settle(now)
        self.speed = speed

    def account(self, nbytes: int, now: float) -> None:
        """nbytes of work were done."""
        self.settle(now)
        if self.speed:
            self._debt += nbytes

    def delay(self, now: float) -> float:
        """Seconds to wait before more work (<= 0: go on)."""
        self.settle(now)
        if not self.speed:
            return 0.0
        return (self._debt - self.speed * self._slice) / self.speed
