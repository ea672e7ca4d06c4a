"""A change that fails may still have changed some of its bytes (a write cut short by
ENOSPC): the disk tells its listeners, and a mirror copies the range from the disk
(found by the chaos soak: seed 1451874751, a commit whose base missed such a write)."""

import nbd
import pytest

from helpers import Control

MiB = 1 << 20
CLUSTER = 64 * 1024


def _wait_copied(qmp, nbytes, timeout=60):
    """Until the mirror has copied at least nbytes (and nothing is left to copy)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        job = qmp.execute("query-block-jobs")[0]
        if job["x-copied-bytes"] >= nbytes and job["offset"] == job["len"]:
            return
        assert time.monotonic() < deadline, "the mirror did not catch up: %s" % job
        time.sleep(0.05)


def test_a_write_cut_short_by_enospc_is_still_mirrored(servers, tmp_path, small_fs, connect):
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(small_fs / "ov", size="64M", control=str(ctl))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(64 * MiB)
    qmp = Control(ctl)
    h = connect(srv.uri)
    qmp.execute("drive-mirror", {"device": "disk0", "target": str(target), "sync": "full",
                                 "mode": "existing"})
    qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    last = None                                  # the last fresh cluster that fitted
    for i in range(64 * MiB // CLUSTER):
        try:
            h.pwrite(b"A" * CLUSTER, i * CLUSTER)
        except nbd.Error as e:
            assert e.errno == "ENOSPC"
            break
        last = i * CLUSTER
    assert last is not None
    _wait_copied(qmp, last + CLUSTER)            # the target holds "A" there now
    # Over that cluster (rewritten in place) and the fresh one after it: the first
    # half lands, the second finds no space, and the client gets ENOSPC.
    with pytest.raises(nbd.Error) as failed:
        h.pwrite(b"N" * (2 * CLUSTER), last)
    assert failed.value.errno == "ENOSPC"
    assert h.pread(CLUSTER, last) == b"N" * CLUSTER, "the premise: a write cut short"
    qmp.execute("block-job-cancel", {"device": "disk0"})        # READY: in sync, no pivot
    qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    with open(target, "rb") as f:
        f.seek(last)
        assert f.read(CLUSTER) == b"N" * CLUSTER
        f.seek(0)
        assert f.read() == h.pread(64 * MiB, 0)
    qmp.close()
