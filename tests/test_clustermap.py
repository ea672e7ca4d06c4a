"""Unit tests of the cluster map, the bitmap and the store's range lock (pure Python)."""

import threading

from plugin.core.bitmap import DirtyBitmap
import errno
import os

import pytest

from plugin.disk.clustermap import ABSENT, DATA, ZERO, ClusterMap, create
from plugin.disk.rangelock import RangeLock


def reopen(path, n):
    m = ClusterMap(str(path), n)
    return m


def new_map(path, n):
    create(str(path), n)
    return ClusterMap(str(path), n)


def test_commit_persists_states(tmp_path):
    m = new_map(tmp_path / "map", 10000)
    m.set(5, 9000, DATA)
    m.set(9000, 9500, ZERO)
    m.commit(lambda: None)
    m.close()
    m = reopen(tmp_path / "map", 10000)
    assert m.states(0, 10000) == bytes(5) + b"\x01" * 8995 + b"\x02" * 500 + bytes(500)


def test_uncommitted_changes_are_not_on_disk(tmp_path):
    m = new_map(tmp_path / "map", 100)
    m.set(0, 10, DATA)
    m.close()
    assert reopen(tmp_path / "map", 100).count(DATA) == 0


def test_a_change_made_while_the_data_syncs_is_not_claimed_by_that_commit(tmp_path):
    """The durability rule: the map written names only data written before the sync."""
    m = new_map(tmp_path / "map", 100)
    m.set(0, 1, DATA)

    def sync_data():
        m.set(50, 51, DATA)            # a write completing during the data sync

    m.commit(sync_data)
    on_disk = reopen(tmp_path / "map", 100)
    assert on_disk.get(0) == DATA and on_disk.get(50) == ABSENT
    m.commit(lambda: None)             # the next commit takes it
    assert reopen(tmp_path / "map", 100).get(50) == DATA


def test_a_failed_data_sync_keeps_the_pages_dirty(tmp_path):
    m = new_map(tmp_path / "map", 100)
    m.set(3, 4, DATA)

    def failing():
        raise OSError(5, "EIO")

    try:
        m.commit(failing)
    except OSError:
        pass
    assert reopen(tmp_path / "map", 100).get(3) == ABSENT
    m.commit(lambda: None)
    assert reopen(tmp_path / "map", 100).get(3) == DATA


def test_run_end_finds_the_end_of_equal_states(tmp_path):
    m = new_map(tmp_path / "map", 100)
    m.set(10, 20, DATA)
    m.set(20, 25, ZERO)
    assert m.run_end(0, 100) == 10
    assert m.run_end(10, 100) == 20
    assert m.run_end(20, 100) == 25
    assert m.run_end(12, 15) == 15


def test_a_new_map_is_written_out_not_sparse(tmp_path):
    create(str(tmp_path / "map"), 1 << 20)
    st = os.stat(tmp_path / "map")
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
    assert ClusterMap(str(tmp_path / "map"), 1 << 20).count(ABSENT) == 1 << 20


def test_a_map_of_the_wrong_length_is_refused_and_left_alone(tmp_path):
    m = new_map(tmp_path / "map", 10)
    m.set(0, 10, DATA)
    m.commit(lambda: None)
    m.close()
    with pytest.raises(OSError) as e:
        ClusterMap(str(tmp_path / "map"), 20)
    assert e.value.errno == errno.EINVAL
    assert (tmp_path / "map").read_bytes() == b"\x01" * 10


def test_create_never_replaces_a_map(tmp_path):
    new_map(tmp_path / "map", 10).close()
    with pytest.raises(FileExistsError):
        create(str(tmp_path / "map"), 10)


def test_bitmap_take_returns_aligned_runs_and_clears_them():
    b = DirtyBitmap(1 << 20, 4096)
    assert b.mark(5000, 10) is True             # was clean
    assert b.mark(100000, 1) is False
    assert b.dirty_bytes() == 8192
    assert b.take(0, 1 << 20) == (4096, 4096)
    assert b.take(0, 1 << 20) == (98304, 4096)
    assert b.take(0, 1 << 20) is None and b.is_clean()


def test_bitmap_take_wraps_and_respects_max_length():
    b = DirtyBitmap(64 * 1024, 1024)
    b.mark(0, 64 * 1024)
    assert b.take(60 * 1024, 8192) == (60 * 1024, 4096)
    assert b.take(64 * 1024, 8192) == (0, 8192)


def test_bitmap_last_granule_is_cut_at_the_disk_size():
    b = DirtyBitmap(10000, 4096)
    b.mark(9999, 1)
    assert b.take(0, 1 << 20) == (8192, 10000 - 8192)


def test_range_lock_excludes_overlaps_only():
    lock = RangeLock()
    t = lock.acquire(0, 10)
    other = lock.acquire(10, 20)                # no overlap: no wait
    got = threading.Event()

    def overlapping():
        token = lock.acquire(5, 6)
        got.set()
        lock.release(token)

    th = threading.Thread(target=overlapping)
    th.start()
    assert not got.wait(0.2)
    lock.release(t)
    assert got.wait(5)
    th.join()
    lock.release(other)


def test_range_lock_try_acquire_never_waits_and_a_timed_out_waiter_leaves():
    """try_acquire (a copy starting) answers at once; acquire with a timeout gives up
    and is no sleeper any more; a release lets the range go to the next taker."""
    lock = RangeLock()
    t = lock.acquire(0, 10)
    assert lock.try_acquire(9, 12) is None
    beside = lock.try_acquire(10, 12)
    assert beside is not None
    assert lock.acquire(5, 6, timeout=0.01) is None
    assert lock._sleepers == 0
    lock.release(t)
    inside = lock.try_acquire(5, 6)
    assert inside is not None and lock.try_acquire(0, 6) is None
    lock.release(inside)
    lock.release(beside)
    assert lock.try_acquire(0, 12) is not None


def test_mark_regions_within_a_window_names_only_its_regions():
    b = DirtyBitmap(64 << 20, 65536)
    b.mark(0, 4096)                    # region 0
    b.mark(5 << 20, 8192)              # region 5
    b.mark(9 << 20, 1 << 20)           # region 9
    out = bytearray(64)
    b.mark_regions(out, 20, 3, 9)
    assert [r for r, v in enumerate(out) if v] == [5]
    b.mark_regions(out, 20)
    assert [r for r, v in enumerate(out) if v] == [0, 5, 9]


def _surely_uncommitted_from_the_file(m, path, first, end):
    """surely_uncommitted() as it was answered before: memory, then the file itself."""
    if m._map.find(b"\x01", first, end) >= 0:
        return False
    with open(path, "rb") as f:
        f.seek(first)
        return b"\x01" not in f.read(end - first)


@pytest.mark.parametrize("pages", [None, 2])
def test_surely_uncommitted_answers_from_memory_what_the_file_holds(tmp_path, monkeypatch,
                                                                    pages):
    """A dirty page's committed bytes are kept from the change that dirtied it until the
    next commit (or, past COMMITTED_PAGES of them, read from the file): the answer is
    the file's in every state a random run of changes, trims and commits goes through,
    and with room for every page no client write reads the file for it."""
    from plugin.disk import clustermap
    if pages is not None:
        monkeypatch.setattr(clustermap, "COMMITTED_PAGES", pages)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(clustermap.os, "pread",
                        lambda *a: reads.append(a) or real_pread(*a))
    import random
    rnd = random.Random(3)
    n = 8 * clustermap.PAGE + 100
    path = tmp_path / "map"
    m = new_map(path, n)
    checks = 0
    for step in range(600):
        op = rnd.random()
        first = rnd.randrange(n)
        end = min(n, first + rnd.choice([1, 3, 50, clustermap.PAGE, 3 * clustermap.PAGE]))
        if op < 0.55:
            m.set(first, end, DATA)
        elif op < 0.75:
            m.set(first, end, rnd.choice([ZERO, ABSENT]))
        elif op < 0.8:
            m.commit(lambda: None)
        for _ in range(4):
            a = rnd.randrange(n)
            b = min(n, a + rnd.choice([1, 2, 16, clustermap.PAGE + 7]))
            assert m.surely_uncommitted(a, b) == _surely_uncommitted_from_the_file(m, path, a, b)
            checks += 1
    assert checks == 2400
    if pages is None:
        assert reads == []
    else:
        assert reads           # more dirty pages than kept: the file answers for the rest
    m.close()


def test_surely_uncommitted_is_false_after_a_failed_commit_until_one_succeeds(tmp_path):
    m = new_map(tmp_path / "map", 100)
    m.set(3, 4, DATA)
    m.commit(lambda: None)
    m.set(3, 4, ZERO)                  # trimmed in memory; the file still says DATA
    assert not m.surely_uncommitted(3, 4)
    assert m.surely_uncommitted(10, 20)

    def failing():
        raise OSError(5, "EIO")

    with pytest.raises(OSError):
        m.commit(failing)
    assert not m.surely_uncommitted(10, 20)
    m.commit(lambda: None)
    assert m.surely_uncommitted(3, 4) and m.surely_uncommitted(10, 20)
