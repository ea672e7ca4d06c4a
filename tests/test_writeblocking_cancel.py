"""A forced cancel frees client I/O at once, whatever a write-blocking mirror's target does.

Issue 24: a write-blocking mirror whose target is SIGSTOPped, then force-cancelled: client
writes made no progress for about a second, because a client write waited (up to
THROUGH_TIMEOUT) for the stopped target while holding the write-through lock, and the
cancel's clean-up waited for that lock too.
"""

import os
import signal
import threading
import time

from faults import MiB, MirrorRig, wait_until


class TimedWriter(threading.Thread):
    """4K writes in a loop on its own connection; records when each one finished."""

    def __init__(self, connect, uri):
        super().__init__(daemon=True)
        self.h = connect(uri)
        self.done = []                    # monotonic time each write returned
        self.stop = threading.Event()
        self.error = None

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                self.h.pwrite(bytes([i % 251]) * 4096, (i % 256) * 65536)
                self.done.append(time.monotonic())
                i += 1
        except Exception as e:            # reported by the test
            self.error = e

    def longest_gap_after(self, t0, until):
        """The longest time in [t0, until] with no write finishing."""
        times = [t0] + [t for t in self.done if t0 < t <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:]))


def test_forced_cancel_frees_client_writes_at_once_when_the_target_is_stopped(
        servers, tmp_path, connect):
    rig = MirrorRig(servers, tmp_path, connect, size=16 * MiB)
    rig.mirror(copy_mode="write-blocking", granularity=65536)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    rig.h.pwrite(b"through" * 100, MiB)       # the write-through connection is up
    writer = TimedWriter(connect, rig.disk.uri)
    os.kill(rig.target.pid, signal.SIGSTOP)
    try:
        writer.start()
        # Writes fall back (each waits for the stopped target first): get into
        # the middle of one such wait, then cancel.
        wait_until(lambda: len(writer.done) >= 1, timeout=10)
        time.sleep(0.3)
        t0 = time.monotonic()
        rig.qmp("block-job-cancel", device="disk0", force=True)
        rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=10)
        cancelled = time.monotonic()
        time.sleep(1.5)
        end = time.monotonic()
        writer.stop.set()
        writer.join(10)
    finally:
        os.kill(rig.target.pid, signal.SIGCONT)
    assert writer.error is None, writer.error
    assert cancelled - t0 < 3.0                          # docs/errors.md: about 3 s
    gap = writer.longest_gap_after(t0, end)
    print("\ncancel took %.3fs; longest client stall after it was sent %.3fs; writes after it %d"
          % (cancelled - t0, gap, sum(1 for t in writer.done if t > t0)))
    assert gap < 0.25, gap
    rig.qmp.wait_status("disk0", "null", timeout=10)


def test_a_cancelled_write_blocking_mirror_writes_nothing_more_to_its_target(
        servers, tmp_path, connect):
    """The job's client-write listener goes with the job (it used to stay registered:
    removed by identity, and a bound method is a new object each time)."""
    rig = MirrorRig(servers, tmp_path, connect, size=4 * MiB)
    rig.mirror(copy_mode="write-blocking")
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    rig.h.pwrite(b"during" * 100, MiB)
    assert rig.target_bytes()[MiB:MiB + 600] == b"during" * 100      # written through
    rig.qmp("block-job-cancel", device="disk0", force=True)
    rig.qmp.wait_status("disk0", "null", timeout=10)
    rig.h.pwrite(b"after!" * 100, 2 * MiB)
    rig.h.flush()
    assert rig.target_bytes()[2 * MiB:2 * MiB + 600] != b"after!" * 100
    assert bytes(rig.h.pread(600, 2 * MiB)) == b"after!" * 100
