"""The soak's bounds (docs/soak.md's table says where each comes from) and its two
exceptions."""

import re

from .rig import RECONNECT_DELAY

MiB = 1 << 20

REQUEST_BOUND = 4.0      # a client request, with no fault in its way (write-through: 2 s)
FINAL_SYNC = 10.0 + RECONNECT_DELAY   # complete / soft cancel may hold clients this long
QMP_BOUND = 5.0          # a QMP reply (drive-mirror waits 1 s for its target; a quiesce
                         # waits for requests in flight, a write-through 2 s)
CANCEL_BOUND = 4.0       # a forced cancel to BLOCK_JOB_CANCELLED (docs/errors.md: about 3 s)
CANCEL_FREE = 0.5        # no client request waits longer than this past a forced cancel
CANCEL_SLACK = 0.25      # a backup frees a client waiting to copy before write as it
                         # cleans up: by its event (docs/backup.md), plus this
SIGTERM_BOUND = 5.0      # nbdkit's exit after SIGTERM
FD_BOUND = 256           # the disk's nbdkit: open descriptors
RSS_BOUND = 320 * MiB    # and resident memory
PAUSE_TIMEOUT = 30.0     # clients reach a request boundary (their requests are bounded)
JOB_END_WAIT = FINAL_SYNC + 5
RETIRED_KEPT = 3         # targets of ended jobs kept served, to see that nothing writes
RETIRED_GRACE = 1.0      # after the job or a SIGCONT: late answers to abandoned writes


# nbdkit's python plugin prints the traceback of every error a request returns to its
# client ("python.1: error: .../overlaydisk.py: pwrite: error: Traceback ..."): those are
# client errors, which the request checks judge; any other traceback is a violation.
TRACEBACK = re.compile(r"^.*Traceback.*$", re.M)
REQUEST_ERROR = re.compile(r"overlaydisk\.py: (pread|pwrite|zero|trim|flush|extents|cache): "
                           r"error: Traceback")


class Violation(Exception):
    """An invariant does not hold: the soak stops here."""


class Skip(Exception):
    """The step does not apply now (no job, a job already runs, ...)."""
