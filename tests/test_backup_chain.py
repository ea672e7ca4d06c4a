"""Incremental backups from a persistent dirty bitmap: a chain of a full backup and three
incrementals onto qcow2 images served by qemu-nbd (each incremental's backing file is the
previous backup) restores with `qemu-img convert` to exactly each point in time; bitmap-mode
and the bitmap checks as QEMU's."""

import pathlib
import random
import subprocess

import pytest
from qemu.qmp import ExecuteError

from conftest import Server, make_image
from faults import _track
from helpers import Control
from test_backup import Writer, wait_until

MiB = 1 << 20
SIZE = 16 * MiB


def qcow2_server(servers, tmp_path, name, backing=None):
    """A fresh qcow2 of the disk's size (on `backing` if given) served by qemu-nbd."""
    image = pathlib.Path(tmp_path) / ("%s.qcow2" % name)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run(cmd + [str(image), str(SIZE)], check=True)
    sock = pathlib.Path(tmp_path) / ("%s.sock" % name)
    argv = ["qemu-nbd", "-k", str(sock), "-t", "-e", "4", "-f", "qcow2", "--cache=writeback",
            str(image)]
    server = _track(servers, Server(argv, sock, pathlib.Path(tmp_path) / ("%s.log" % name)))
    return image, server


def restore(image, tmp_path, name):
    out = pathlib.Path(tmp_path) / ("%s.raw" % name)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def allocated_in_top(image):
    """Bytes the qcow2 itself holds (not its backing chain)."""
    import json
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
                         check=True, capture_output=True, text=True).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"] and e["depth"] == 0)


class Disk:
    def __init__(self, servers, tmp_path, connect):
        self.servers, self.tmp, self.connect = servers, tmp_path, connect
        base = make_image(tmp_path / "base.img", SIZE, [(0, 3 * MiB), (9 * MiB, 2 * MiB)],
                          seed=5)
        self.ctl = tmp_path / "ctl.sock"
        self.srv = servers.overlay(tmp_path / "ov", base=base, control=str(self.ctl))
        self.qmp = Control(self.ctl)
        self.h = connect(self.srv.uri)

    def read(self):
        return bytes(self.h.pread(SIZE, 0))

    def restart(self):
        self.qmp.close()
        self.srv.kill9()
        self.srv = self.servers.restart(self.srv)
        self.qmp = Control(self.ctl)
        self.h = self.connect(self.srv.uri)


@pytest.mark.slow
def test_full_and_three_incrementals_onto_qcow2_restore_to_each_point_in_time(
        servers, tmp_path, connect):
    d = Disk(servers, tmp_path, connect)
    # The writer keeps to the first half: the second half never changes, so an
    # incremental that copied it would be caught.
    w = Writer(d.srv.uri, SIZE // 2, seed=9)
    w.start()
    w.go()
    wait_until(lambda: w.count > 20)
    images, models = [], []
    # The full backup and the bitmap that starts the chain, atomically.
    w.pause()
    models.append(d.read())
    image, target = qcow2_server(servers, tmp_path, "full")
    d.qmp("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b0", "persistent": True}},
        {"type": "drive-backup",
         "data": {"device": "disk0", "target": target.uri, "sync": "full", "job-id": "full"}}])
    w.go()
    d.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120, device="full")
    target.stop()           # qemu-nbd holds the image's write lock; the next layer reads it
    images.append(image)
    for n in range(1, 4):
        wait_until(lambda c=w.count: w.count > c + 10)
        if n == 2:
            w.pause()
            d.restart()                   # the bitmap survives kill -9
            w.reconnect(d.srv.uri)
            w.go()
            wait_until(lambda c=w.count: w.count > c + 5)
        w.pause()
        models.append(d.read())
        dirty = sum(b["count"] for b in d.qmp("query-block")[0]["dirty-bitmaps"])
        # After the kill -9 the bitmap may hold more (whole regions), never less.
        assert 0 < dirty <= (SIZE if n == 2 else SIZE // 2)
        image, target = qcow2_server(servers, tmp_path, "inc%d" % n, backing=images[-1])
        d.qmp("drive-backup", device="disk0", target=target.uri, sync="incremental",
              bitmap="b0", job_id="inc%d" % n)
        w.go()
        e = d.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=120, device="inc%d" % n)
        assert "error" not in e["data"]
        target.stop()
        images.append(image)
        # Only the bitmap's ranges were written into this layer.
        assert allocated_in_top(image) <= dirty + 2 * 65536
        # The bitmap now holds the writes since this point in time only.
        info = d.qmp("query-block")[0]["dirty-bitmaps"][0]
        assert info["busy"] is False and info["recording"] is True
    w.finish()
    for n, (image, model) in enumerate(zip(images, models)):
        assert restore(image, tmp_path, "restored%d" % n) == model, "point %d" % n
    d.qmp.close()


def test_bitmap_mode_never_keeps_the_bitmap_and_a_failed_backup_gives_it_back(
        servers, tmp_path, connect):
    d = Disk(servers, tmp_path, connect)
    d.qmp("block-dirty-bitmap-add", node="disk0", name="b", persistent=True)
    d.h.pwrite(b"\x11" * MiB, 2 * MiB)
    before = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b")
    image, target = qcow2_server(servers, tmp_path, "t")
    d.qmp("drive-backup", device="disk0", target=target.uri, sync="bitmap", bitmap="b",
          bitmap_mode="never", job_id="n")
    d.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device="n")
    assert d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b") == before
    # on-success, but the target is gone: the job fails and the bitmap keeps everything.
    d.h.pwrite(b"\x22" * 65536, 7 * MiB)
    held = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b")
    missing = tmp_path / "missing.sock"
    with pytest.raises(ExecuteError, match="Could not open"):
        d.qmp("drive-backup", device="disk0", sync="incremental", bitmap="b", job_id="f",
              target="nbd+unix:///?socket=%s" % missing)
    assert d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b") == held
    d.qmp.close()


def test_incremental_backup_failing_on_the_target_gives_the_bitmap_back(
        servers, tmp_path, connect):
    from faults import FaultSwitch, error_args
    d = Disk(servers, tmp_path, connect)
    d.qmp("block-dirty-bitmap-add", node="disk0", name="b", persistent=True)
    rnd = random.Random(3)
    for _ in range(10):
        d.h.pwrite(rnd.randbytes(65536), rnd.randrange(SIZE // 65536) * 65536)
    held = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b")
    switch = FaultSwitch(tmp_path / "fault", on=True)
    target_file = tmp_path / "t.img"
    with open(target_file, "wb") as f:
        f.truncate(SIZE)
    target = servers.nbdkit("file", str(target_file), *error_args(switch), filters=["error"])
    d.qmp("drive-backup", device="disk0", target=target.uri, sync="incremental", bitmap="b",
          job_id="f")
    e = d.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60, device="f")
    assert e["data"]["error"] == "Input/output error"
    d.h.pwrite(b"\x33" * 4096, 15 * MiB)     # after the failure: recorded as usual
    after = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b")
    covered = {(x["offset"], x["length"]) for x in held["extents"]}
    assert covered
    dirty = after["extents"]
    for off, n in covered:
        assert any(x["offset"] <= off and off + n <= x["offset"] + x["length"] for x in dirty)
    assert any(x["offset"] <= 15 * MiB < x["offset"] + x["length"] for x in dirty)
    assert d.qmp("query-block")[0]["dirty-bitmaps"][0]["busy"] is False
    d.qmp.close()


def test_bitmap_arguments_are_checked_as_qemu_does(servers, tmp_path, connect):
    d = Disk(servers, tmp_path, connect)
    d.qmp("block-dirty-bitmap-add", node="disk0", name="b")
    target = tmp_path / "t.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    cases = [
        (dict(sync="incremental", bitmap="nope"), "Bitmap 'nope' could not be found"),
        (dict(sync="bitmap", bitmap="b"), "Bitmap sync mode must be given when providing a "
                                          "bitmap"),
        (dict(sync="incremental", bitmap="b", bitmap_mode="never"),
         "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
        (dict(sync="none", bitmap="b", bitmap_mode="on-success"),
         "sync mode 'none' does not produce meaningful bitmap outputs"),
        (dict(sync="full", bitmap="b", bitmap_mode="never"),
         "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode "
         "'full'"),
        (dict(sync="full", bitmap_mode="always"),
         "Cannot specify bitmap sync mode without a bitmap"),
    ]
    for args, text in cases:
        with pytest.raises(ExecuteError) as e:
            d.qmp("drive-backup", device="disk0", target=str(target), **args)
        assert str(e.value) == text, args
    # While a backup holds it, the bitmap is busy: QEMU's text for every refusal.
    d.qmp("drive-backup", device="disk0", target="export:v", sync="full", bitmap="b",
          bitmap_mode="on-success", job_id="v")
    assert d.qmp("query-block")[0]["dirty-bitmaps"][0]["busy"] is True
    busy = "Bitmap 'b' is currently in use by another operation and cannot be used"
    for command in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear"):
        with pytest.raises(ExecuteError) as e:
            d.qmp(command, node="disk0", name="b")
        assert str(e.value) == busy
    d.qmp("block-job-cancel", device="v")
    d.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    assert d.qmp("query-block")[0]["dirty-bitmaps"][0]["busy"] is False
    d.qmp.close()


def test_pull_mode_incremental_reads_only_the_frozen_bitmaps_ranges_of_the_view(
        servers, tmp_path, connect):
    """docs/backup.md's pull script: a new bitmap, the old one disabled and the view
    exported in one transaction; the changed ranges read from the view are the disk's
    bytes at that instant while a client keeps writing."""
    d = Disk(servers, tmp_path, connect)
    d.qmp("block-dirty-bitmap-add", node="disk0", name="b0", persistent=True)
    rnd = random.Random(7)
    for _ in range(12):
        d.h.pwrite(rnd.randbytes(65536), rnd.randrange(SIZE // 65536) * 65536)
    w = Writer(d.srv.uri, SIZE, seed=8)
    w.start()
    model = d.read()
    d.qmp("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "b1", "persistent": True}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
        {"type": "drive-backup",
         "data": {"device": "disk0", "job-id": "pull", "sync": "none", "target": "export:pit"}}])
    w.go()
    wait_until(lambda: w.count > 30)
    view = connect(d.srv.uri.replace(":///?", ":///pit?"))
    changed = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b0",
                    max_extents=4)
    extents = list(changed["extents"])
    while "next" in changed:
        changed = d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b0",
                        offset=changed["next"], max_extents=4)
        extents += changed["extents"]
    assert 0 < sum(e["length"] for e in extents) < SIZE
    for e in extents:
        off, n = e["offset"], e["length"]
        assert bytes(view.pread(n, off)) == model[off:off + n]
    w.finish()
    assert d.qmp("x-block-dirty-bitmap-extents", node="disk0", name="b1")["extents"]
    d.qmp("block-job-cancel", device="pull")
    d.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
    d.qmp.close()
