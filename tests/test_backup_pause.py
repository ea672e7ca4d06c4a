"""A paused backup does not hold client writes: the copies it had in flight when it
paused are collected first (issue 24's soak, seed 7001: a client write into a granule
whose copy was in flight waited, to copy before write, for as long as the backup stayed
paused, and nbdkit could not stop on SIGTERM meanwhile)."""

import re
import threading

from conftest import make_image
from faults import wait_until
from helpers import Control

MiB = 1 << 20
SIZE = 8 * MiB


def _answered(text):
    sent = len(re.findall(r"(?<!\.\.\.)Write id=", text))
    return sent == len(re.findall(r"\.\.\.Write id=", text))


def test_a_client_write_into_a_granule_in_flight_when_the_backup_paused_goes_through(
        servers, tmp_path, connect):
    base = make_image(tmp_path / "base.img", SIZE, [(0, SIZE)], seed=4)
    ctl = tmp_path / "ctl.sock"
    disk = servers.overlay(tmp_path / "ov", base=base, control=str(ctl))
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(SIZE)
    log = tmp_path / "target-requests.log"
    # Each write takes a second: the first copies are in flight when the pause comes.
    target = servers.nbdkit("file", str(target_path), "delay-write=1", "logfile=%s" % log,
                            filters=["log", "delay"])
    qmp = Control(ctl)
    h = connect(disk.uri)
    qmp("drive-backup", device="disk0", job_id="b", target=target.uri, sync="full")
    wait_until(lambda: log.exists() and "Write id=" in log.read_text(), timeout=10)
    qmp("block-job-pause", device="b")
    qmp.wait_status("b", "paused", timeout=10)
    # Paused means collected: every write the target was sent has its answer.
    wait_until(lambda: _answered(log.read_text()), timeout=10)
    done = threading.Event()

    def write():
        h.pwrite(b"\x77" * 65536, 0)              # the first chunk: its copy was in flight
        done.set()

    threading.Thread(target=write, daemon=True).start()
    if not done.wait(5):
        qmp("block-job-cancel", device="b", force=True)      # frees it, for the clean-up
        assert done.wait(10)
        raise AssertionError("a client write waited on a paused backup")
    qmp("block-job-resume", device="b")
    qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert target_path.read_bytes() == open(base, "rb").read()
    qmp.close()
