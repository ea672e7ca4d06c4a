"""Unit tests of the cluster map's journal (plugin/disk/mapjournal.py) with the map.

A "crash" here is what kill -9 leaves: the files as the page cache holds them,
with no commit and no close of the map (its descriptors are dropped)."""

import os

from plugin.disk import mapjournal
from plugin.disk.clustermap import ABSENT, DATA, ZERO, ClusterMap, create
from plugin.disk.mapjournal import JOURNAL_BYTES, RECORD_BYTES, MapJournal

BOOT = bytes(range(16))
OTHER_BOOT = bytes(range(1, 17))


class Dir:
    """A map with its journal in tmp_path; open() is a server start."""

    def __init__(self, tmp_path, n=100):
        self.path = tmp_path
        self.n = n
        self.syncs = 0
        create(str(tmp_path / "map"), n)

    def sync_data(self):
        self.syncs += 1

    def open(self, boot=BOOT):
        journal = MapJournal([str(self.path / name) for name in mapjournal.NAMES], boot=boot)
        return ClusterMap(str(self.path / "map"), self.n, journal, self.sync_data)

    def committed(self):
        """The map as clusters.map holds it, without replaying anything."""
        return ClusterMap(str(self.path / "map"), self.n).states(0, self.n)


def crash(m):
    """kill -9: nothing more is written; the descriptors go with the process."""
    os.close(m._fd)
    m._journal.close()


def test_a_change_not_flushed_outlives_a_crash_in_the_same_boot(tmp_path):
    d = Dir(tmp_path)
    m = d.open()
    m.set(3, 4, DATA)
    m.set(10, 20, ZERO)
    crash(m)
    assert d.committed() == bytes(100)             # clusters.map only changes at a commit
    m = d.open()
    assert m.get(3) == DATA and m.states(10, 20) == b"\x02" * 10 and m.count(ABSENT) == 89
    assert d.committed() == m.states(0, 100)       # the replay was committed at once
    assert d.syncs == 1                            # data synced before the map claims it


def test_after_another_boot_only_the_committed_map_counts(tmp_path):
    """Power loss: a record may name data that never reached the disk."""
    d = Dir(tmp_path)
    m = d.open()
    m.set(1, 2, DATA)
    m.commit()
    m.set(5, 6, DATA)
    crash(m)
    m = d.open(boot=OTHER_BOOT)
    assert m.get(1) == DATA and m.get(5) == ABSENT
    m.set(7, 8, DATA)                              # the new boot's journal works
    crash(m)
    m = d.open(boot=OTHER_BOOT)
    assert m.get(7) == DATA and m.get(5) == ABSENT


def test_later_records_win_and_span_both_files(tmp_path):
    d = Dir(tmp_path)
    m = d.open()
    m.set(0, 10, DATA)
    m.commit()                                     # rotates: new records in the other file
    m.set(2, 4, ZERO)
    m.commit()                                     # rotates back
    m.set(3, 4, DATA)
    crash(m)
    m = d.open()
    assert m.states(0, 10) == b"\x01\x01\x02\x01" + b"\x01" * 6


def test_the_older_file_still_counts_when_a_commit_failed(tmp_path):
    """A commit that failed leaves its changes only in the journal: the next
    rotation must not overwrite the file that holds them."""
    d = Dir(tmp_path)
    m = d.open()
    m.set(4, 5, DATA)

    def failing():
        raise OSError(5, "EIO")

    for _ in range(3):                             # each would rotate if it could
        try:
            m.commit(failing)
        except OSError:
            pass
        m.set(6, 7, ZERO)
    crash(m)
    m = d.open()
    assert m.get(4) == DATA and m.get(6) == ZERO


def test_a_stale_tail_of_an_older_generation_is_not_replayed(tmp_path):
    d = Dir(tmp_path)
    m = d.open()
    for c in range(20):
        m.set(c, c + 1, DATA)                      # 20 records in file 0
    m.commit()                                     # new records go to file 1
    m.commit()                                     # nothing changed: no rotation
    m.set(0, 20, ZERO)
    m.commit()                                     # file 0 again, under a new header
    m.set(30, 31, ZERO)                            # over the first old record only
    crash(m)
    m = d.open()
    assert m.states(0, 20) == b"\x02" * 20 and m.get(30) == ZERO
    assert m.count(DATA) == 0


def test_a_corrupt_record_ends_the_replay(tmp_path):
    d = Dir(tmp_path)
    m = d.open()
    m.set(1, 2, DATA)
    m.set(2, 3, DATA)
    m.set(3, 4, DATA)
    crash(m)
    path = tmp_path / mapjournal.NAMES[0]
    with open(path, "r+b") as f:                   # corrupt the second record's state
        f.seek(RECORD_BYTES * 2 + 24)
        f.write(b"\x07")
    m = d.open()
    assert m.states(0, 5) == b"\x00\x01\x00\x00\x00"


def test_a_full_journal_commits_instead(tmp_path):
    d = Dir(tmp_path, n=40000)
    m = d.open()
    capacity = (JOURNAL_BYTES - RECORD_BYTES) // RECORD_BYTES
    for c in range(capacity):
        m.set(c, c + 1, DATA)
    assert d.syncs == 0 and d.committed().count(b"\x01") == 0
    m.set(capacity, capacity + 1, DATA)            # no room: committed at once
    assert d.syncs == 1 and d.committed().count(b"\x01") == capacity + 1
    m.set(capacity + 1, capacity + 2, ZERO)        # the commit rotated: journaled again
    assert d.syncs == 1
    crash(m)
    m = d.open()
    assert m.get(capacity + 1) == ZERO and m.count(DATA) == capacity + 1


def test_the_journal_files_are_allocated_at_open(tmp_path):
    d = Dir(tmp_path)
    d.open().close()
    for name in mapjournal.NAMES:
        st = os.stat(tmp_path / name)
        assert st.st_size == JOURNAL_BYTES and st.st_blocks * 512 >= JOURNAL_BYTES


def test_boot_id_reads_the_kernels_id():
    boot = mapjournal.boot_id()
    assert boot is not None and len(boot) == 16 and boot == mapjournal.boot_id()


def test_records_written_through_the_mapping_are_in_the_file_at_once(tmp_path):
    """The page cache holds them (what kill -9 leaves) with no close and no sync."""
    j = MapJournal([str(tmp_path / n) for n in mapjournal.NAMES], boot=BOOT)
    j.recover()
    j.start()
    assert all(m is not None for m in j._maps)
    assert j.append(7, 9, ZERO)
    other = MapJournal([str(tmp_path / n) for n in mapjournal.NAMES], boot=BOOT)
    assert other.recover() == [(7, 9, ZERO)]
    other.close()
    j.close()


def test_a_crash_while_the_open_resets_the_journal_never_replays_older_records_alone(tmp_path):
    """File 1 holds the newer generation here (cluster 3: DATA in file 0, then ZERO in
    file 1).  The open replays both and resets them; dying after the first reset must not
    leave the older file to be replayed alone over the newer state."""
    d = Dir(tmp_path)
    m = d.open()
    m.set(3, 4, DATA)                              # file 0
    m.commit()                                     # rotates: file 1
    m.set(3, 4, ZERO)                              # file 1: newer
    crash(m)
    stores = []
    original = MapJournal._store

    def dying(self, index, data, pos):
        if stores:
            raise SystemExit("killed")             # the second header write never happens
        stores.append(index)
        original(self, index, data, pos)

    MapJournal._store = dying
    try:
        try:
            d.open()
        except SystemExit:
            pass
    finally:
        MapJournal._store = original
    m = d.open()
    assert m.get(3) == ZERO
