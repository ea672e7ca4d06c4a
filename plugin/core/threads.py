"""Threads the system can tell apart: each gives its native thread its Python name.

Python 3.11 names its threads for Python only; /proc, `top -H`, `ps -L`, perf
and py-spy see every thread of the server as "nbdkit" (a thread takes its
creator's name).  Ours name themselves as they start ("job-disk0",
"qmp-control", "bitmap-checkpoints", ...), cut to the kernel's 15 bytes, so an
operator sees which job uses the CPU, and a benchmark can read a job thread's
CPU time from /proc/PID/task/TID/stat.  nbdkit's own threads (the requests)
keep their name.
"""

import threading

COMM_BYTES = 15          # TASK_COMM_LEN - 1


def name_native(name):
    """Name the calling thread in /proc (a no-op where /proc does not take it)."""
    try:
        with open("/proc/thread-self/comm", "wb", buffering=0) as f:
            f.write(name.encode("utf-8", "replace")[:COMM_BYTES])
    except OSError:
        pass


class Thread(threading.Thread):
    """threading.Thread whose native thread takes its name as it starts."""

    def run(self):
        name_native(self.name)
        super().run()
