"""What this process holds: memory, descriptors, threads (x-query-process, jobctl metrics).

Read from /proc/self on each call: a metrics scrape is rare, and these are the
kernel's numbers, not estimates.  Also the count of open NBD connections,
which only the nbdkit callbacks see.
"""

import os
import resource
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat():
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after it.
    return stat[stat.rindex(b")") + 2:].split()


def _boot_time():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    return None


def usage():
    """{"pid", "rss-bytes", "fds", "fd-limit", "threads", "start-time", "cpu-seconds"}.

    start-time is seconds since the epoch (as Prometheus' process_start_time_seconds);
    fd-limit is the soft RLIMIT_NOFILE.  A value /proc cannot give is left out.
    """
    info = {"pid": os.getpid(), "fd-limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
    try:
        fields = _proc_stat()
        # Fields counted from 3 (state): utime 14, stime 15, num_threads 20,
        # starttime 22, rss 24 (pages).
        info["cpu-seconds"] = (int(fields[11]) + int(fields[12])) / _TICKS
        info["threads"] = int(fields[17])
        info["rss-bytes"] = int(fields[21]) * _PAGE
        btime = _boot_time()
        if btime is not None:
            info["start-time"] = btime + int(fields[19]) / _TICKS
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return info


class OpenCount:
    """How many of something are open now, and how many were ever opened
    (NBD connections: nbdkit's open and close callbacks call opened/closed)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.open = 0
        self.total = 0

    def opened(self):
        with self._lock:
            self.open += 1
            self.total += 1

    def closed(self):
        with self._lock:
            self.open -= 1
