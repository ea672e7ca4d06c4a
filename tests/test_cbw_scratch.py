"""The copy-before-write scratch (plugin/blockcopy/scratch.py): one sync per save, the
entries trusted on the same boot and checked by crc after another, the older two-file
format converted; and when a save may leave its sync to the store's next commit
(ClusterMap.surely_uncommitted, the commit hook)."""

import os
import random

import pytest

from helpers import LocalDisk
from plugin.blockcopy.bytemap import ByteMap
from plugin.blockcopy.scratch import ScratchFile
from plugin.blockcopy.snapshot import PointInTime
from plugin.disk.clustermap import DATA, ZERO, ClusterMap, create
from plugin.disk.rangelock import RangeLock

G = 64 << 10
SIZE = 16 * G + 4096          # the last granule is short
BOOT_A, BOOT_B = b"A" * 16, b"B" * 16


def granule(i, seed=0):
    n = min(G, SIZE - i * G)
    return random.Random(i * 1000 + seed).randbytes(n)


def test_saves_are_there_after_a_crash_on_the_same_boot_without_a_sync(tmp_path):
    path = str(tmp_path / "x.cbw")
    s = ScratchFile(path, SIZE, G, create=True, boot=BOOT_A)
    s.save(2, 3, granule(2))
    s.save(16, 17, granule(16))              # the short last granule
    s.save(5, 7, granule(5) + granule(6))
    s.close()                                # no sync: the page cache keeps them (kill -9)
    again = ScratchFile(path, SIZE, G, create=False, boot=BOOT_A)
    assert again.runs(1) == [(2, 3), (5, 7), (16, 17)]
    buf = bytearray(G)
    again.readinto(memoryview(buf), 5 * G)
    assert bytes(buf) == granule(5)
    assert again.repaired == 0


def test_after_another_boot_only_entries_whose_bytes_match_count(tmp_path):
    path = str(tmp_path / "x.cbw")
    s = ScratchFile(path, SIZE, G, create=True, boot=BOOT_A)
    for i in (1, 3, 4):
        s.save(i, i + 1, granule(i))
    s.close()
    # A power cut: granule 3's entry reached the disk, its bytes did not.
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, bytes(G), 3 * G)
    os.close(fd)
    again = ScratchFile(path, SIZE, G, create=False, boot=BOOT_B)
    assert again.runs(1) == [(1, 2), (4, 5)]
    assert again.repaired == 1
    again.close()
    # The bad entry is gone for good, so the same-boot rule holds from here.
    third = ScratchFile(path, SIZE, G, create=False, boot=BOOT_B)
    assert third.runs(1) == [(1, 2), (4, 5)]


def test_a_damaged_scratch_is_refused(tmp_path):
    path = str(tmp_path / "x.cbw")
    ScratchFile(path, SIZE, G, create=True, boot=BOOT_A).close()
    with open(path, "r+b") as f:
        f.truncate(SIZE)                     # the older format's length, no ID.saved beside it
    with pytest.raises(OSError, match="expected"):
        ScratchFile(path, SIZE, G, create=False, boot=BOOT_A)


def test_the_older_two_file_format_is_converted(tmp_path):
    base = str(tmp_path / "job")
    count = (SIZE + G - 1) // G
    # As the earlier version left it: the scratch the disk's size, ID.saved, ID.needed.
    with open(base + ".cbw", "wb") as f:
        f.truncate(SIZE)
        f.seek(7 * G)
        f.write(granule(7))
    saved = ByteMap(base + ".saved", count, 0, create=True)
    saved.set([(7, 8)], 1)
    saved.close()
    needed = ByteMap(base + ".needed", count, 1, create=True)
    needed.close()
    ByteMap(base + ".answered", count, 0, create=True).close()
    store = _Store(SIZE)
    pit = PointInTime(store, SIZE, G, RangeLock(), base)
    assert not os.path.exists(base + ".saved")
    assert pit.saved.runs(1) == [(7, 8)]
    buf = bytearray(G)
    pit.read(buf, 7 * G)
    assert bytes(buf) == granule(7)
    pit.close()
    again = ScratchFile(base + ".cbw", SIZE, G, create=False, boot=BOOT_B)
    assert again.runs(1) == [(7, 8)] and again.repaired == 0


class _Store:
    """A disk of zeros with no overlay (every save is synced at once)."""

    def __init__(self, size):
        self.size = size

    def read(self, buf, offset):
        buf[:] = bytes(len(buf))


# -- when a save's sync is left to the next commit ------------------------------------

def test_surely_uncommitted_follows_the_committed_map(tmp_path):
    create(str(tmp_path / "map"), 100)
    m = ClusterMap(str(tmp_path / "map"), 100)
    assert m.surely_uncommitted(0, 100)
    m.set(10, 12, DATA)
    assert not m.surely_uncommitted(11, 13)          # data in memory
    assert m.surely_uncommitted(12, 100)
    m.commit(lambda: None)
    m.set(10, 12, ZERO)                              # trimmed, not committed yet
    assert not m.surely_uncommitted(10, 11)          # the committed map still says data
    m.commit(lambda: None)
    assert m.surely_uncommitted(10, 12)


def test_a_failed_commit_makes_nothing_sure_until_one_succeeds(tmp_path):
    create(str(tmp_path / "map"), 100)
    m = ClusterMap(str(tmp_path / "map"), 100)
    m.set(0, 1, DATA)

    def failing():
        raise OSError(5, "EIO")

    with pytest.raises(OSError):
        m.commit(failing)
    assert not m.surely_uncommitted(50, 60)
    m.commit(lambda: None)
    assert m.surely_uncommitted(50, 60)


def test_commit_hooks_run_before_the_data_sync_and_fail_the_commit(tmp_path):
    create(str(tmp_path / "map"), 100)
    m = ClusterMap(str(tmp_path / "map"), 100)
    order = []

    class Hook:
        fail = False

        def run(self):
            order.append("hook")
            if self.fail:
                raise OSError(28, "ENOSPC")

    hook = Hook()
    m.add_commit_hook(hook.run)
    m.set(0, 1, DATA)
    m.commit(lambda: order.append("data"))
    assert order == ["hook", "data"]
    hook.fail = True
    m.set(1, 2, DATA)
    with pytest.raises(OSError):
        m.commit(lambda: order.append("data"))
    assert ClusterMap(str(tmp_path / "map"), 100).get(1) != DATA
    m.remove_commit_hook(hook.run)                   # a new bound method: removed by ==
    m.commit(lambda: None)
    assert ClusterMap(str(tmp_path / "map"), 100).get(1) == DATA


def _pit(local, tmp_path, name, needed):
    os.makedirs(str(tmp_path / "jobs"), exist_ok=True)
    pit = PointInTime(local.disk.store, local.disk.size, local.disk.store.cluster_size,
                      RangeLock(), str(tmp_path / "jobs" / name), needed_runs=needed)
    local.disk.add_guard(pit)
    return pit


def _drop(local, pit):
    local.disk.remove_guard(pit)
    pit.close()


def test_a_first_write_into_a_fresh_cluster_leaves_its_save_sync_to_the_flush(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(random.Random(1).randbytes(4 << 20))
    local = LocalDisk(tmp_path, base)
    disk = local.disk
    cs = disk.store.cluster_size
    try:
        pit = _pit(local, tmp_path, "b", [(0, disk.size)])
        disk.write(b"\x11" * 4096, 3 * cs)           # a cluster the overlay lacks
        assert pit.saved.runs(1) == [(3, 4)]
        assert pit.saved.pending                     # saved, its sync left to the flush
        disk.flush()
        assert not pit.saved.pending                 # the commit's hook synced it first
        disk.write(b"\x33" * 4096, 3 * cs + 8192)    # saved already: nothing to save
        assert not pit.saved.pending
        _drop(local, pit)
        # Cluster 3 is committed data now: a save before a change there is synced at once.
        pit = _pit(local, tmp_path, "c", [(3 * cs, cs)])
        disk.write(b"\x44" * 4096, 3 * cs)
        assert pit.saved.runs(1) == [(3, 4)] and not pit.saved.pending
        view = bytearray(cs)
        pit.read(view, 3 * cs)
        assert view[:4096] == b"\x11" * 4096         # the point in time
        assert view[8192:12288] == b"\x33" * 4096
        _drop(local, pit)
    finally:
        local.close()
