"""Section "delta": a delta mirror (drive-mirror sync=incremental from a dirty bitmap) against a
full mirror of the same disk, on one server of ours.

Each run: our plugin with an empty overlay on a random base of --size bytes; a
`transaction` [block-dirty-bitmap-add b0 persistent, drive-backup full] puts the disk as it is
onto a target file (the older copy on the far side; not timed); then random 64 KiB writes at
distinct aligned offsets change 5% of the disk.  Timed, interleaved:

- full:  drive-mirror sync=full to a fresh sparse target, until BLOCK_JOB_READY (the anchor);
- delta: drive-mirror sync=incremental bitmap=b0 to the backup's target, until READY.

Both tables: seconds to READY and the bytes the job wrote (x-copied-bytes, what the target
received as data).  Goals (issue 23): delta <= 0.15x the time and <= 0.1x the bytes.
"""

import os
import random
import shutil

from jobctl.qmp_client import QMPClient

from benchlib.bench import human_size
from benchlib.mirror import TIMEOUT, _cancel, _start_ours, _target, _until_ready
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal

TITLE = "delta mirror (a dirty bitmap's ranges) vs full mirror: time to READY and bytes written"
SECTION = "delta"
CHANGED = 0.05
CHUNK = 64 * 1024


def run(bench):
    ready = bench.group(SECTION, "ready", "seconds to BLOCK_JOB_READY, %s disk, %d%% changed"
                        % (human_size(bench.size), CHANGED * 100), "s", bench.size)
    ready.row("full", "drive-mirror sync=full to an empty target", anchor=True)
    ready.row("delta", "drive-mirror sync=incremental bitmap=b0 to last backup's copy",
              goal=Goal(0.15))
    written = bench.group(SECTION, "bytes", "bytes the job wrote to the target (x-copied-bytes)",
                          "B")
    written.row("full", "drive-mirror sync=full", anchor=True)
    written.row("delta", "drive-mirror sync=incremental", goal=Goal(0.1))
    base = make_base(bench)
    for i in range(bench.runs):
        bench.progress("delta: run %d/%d" % (i + 1, bench.runs))
        server, state, control = _start_ours(bench, base, "overlay-delta")
        older, older_server = _target(bench)
        fresh, fresh_server = _target(bench)
        try:
            with QMPClient(control, timeout=TIMEOUT) as qmp:
                _older_copy(qmp, older)
                _change(server.uri, bench.size, seed=i)
                for key in rotated(["full", "delta"], i):
                    if key == "full":
                        args = {"device": "disk0", "target": fresh_server.uri, "sync": "full",
                                "job-id": "full"}
                    else:
                        args = {"device": "disk0", "target": older_server.uri,
                                "sync": "incremental", "bitmap": "b0", "job-id": "delta"}
                    seconds = _until_ready(qmp, "drive-mirror", args)
                    info = [j for j in qmp.execute("query-block-jobs", {})
                            if j["device"] == args["job-id"]][0]
                    _cancel(qmp, args["job-id"])
                    ready.add(key, seconds)
                    written.add(key, info["x-copied-bytes"])
        finally:
            bench.servers.stop(server)
            for path, srv in ((older, older_server), (fresh, fresh_server)):
                bench.servers.stop(srv)
                os.unlink(path)
            shutil.rmtree(state, ignore_errors=True)


def _older_copy(qmp, path):
    """The disk as it is now onto `path`, with the bitmap that starts recording now."""
    qmp.execute("transaction", {"actions": [
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b0", "persistent": True}},
        {"type": "drive-backup", "data": {"device": "disk0", "target": path, "sync": "full",
                                          "job-id": "older"}}]})
    while True:
        event = qmp.next_event(TIMEOUT)
        if event is None:
            raise RuntimeError("the backup that makes the older copy did not end")
        if event["event"] == "BLOCK_JOB_COMPLETED":
            if event["data"].get("error"):
                raise RuntimeError("the older copy's backup failed: %s" % event["data"])
            return


def _change(uri, size, seed):
    """Random 64 KiB writes at distinct aligned offsets: CHANGED of the disk."""
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    rnd = random.Random(seed)
    blocks = rnd.sample(range(size // CHUNK), int(size * CHANGED) // CHUNK)
    for block in blocks:
        h.pwrite(rnd.randbytes(CHUNK), block * CHUNK)
    h.flush()
    h.shutdown()
