"""ClusterMap.clear(): a commit's complete empties the overlay in one step a crash cannot split.

A "crash" is what kill -9 leaves (the files as the page cache holds them, no
close), as in test_mapjournal.py; "power loss" is a start in another boot.
"""

import os

import pytest

from plugin.disk import mapjournal
from plugin.disk.clustermap import ABSENT, DATA, TMP, ZERO, ClusterMap, create
from plugin.disk.mapjournal import MapJournal

BOOT = bytes(range(16))
OTHER_BOOT = bytes(range(1, 17))
N = 9000                  # more than two pages of the map


class Dir:
    def __init__(self, tmp_path):
        self.path = tmp_path
        create(str(tmp_path / "map"), N)

    def open(self, boot=BOOT):
        journal = MapJournal([str(self.path / name) for name in mapjournal.NAMES], boot=boot)
        return ClusterMap(str(self.path / "map"), N, journal, lambda: None)


def crash(m):
    os.close(m._fd)
    m._journal.close()


def fill(m):
    """Committed states and journaled ones (both journal files hold records)."""
    m.set(0, 10, DATA)
    m.set(5000, 5003, ZERO)
    m.commit()
    m.set(20, 30, DATA)
    m.set(8999, 9000, DATA)


@pytest.mark.parametrize("boot", [BOOT, OTHER_BOOT])
def test_clear_empties_the_map_and_nothing_comes_back_after_a_crash(tmp_path, boot):
    d = Dir(tmp_path)
    m = d.open()
    fill(m)
    m.clear()
    assert m.count(ABSENT) == N
    crash(m)
    m = d.open(boot)
    assert m.count(ABSENT) == N
    assert not os.path.exists(str(tmp_path / "map") + TMP)


def test_changes_after_clear_are_journaled_again(tmp_path):
    d = Dir(tmp_path)
    m = d.open()
    fill(m)
    m.clear()
    m.set(40, 41, DATA)
    crash(m)
    m = d.open()
    assert m.get(40) == DATA and m.count(ABSENT) == N - 1
    m.set(41, 42, ZERO)
    m.commit()
    m.close()
    m = d.open(OTHER_BOOT)
    assert m.get(40) == DATA and m.get(41) == ZERO


def test_a_clear_that_fails_before_its_rename_leaves_the_map_whole(tmp_path, monkeypatch):
    d = Dir(tmp_path)
    m = d.open()
    fill(m)
    expected = m.states(0, N)

    def no_rename(src, dst):
        raise OSError(5, "rename failed")

    monkeypatch.setattr(os, "rename", no_rename)
    with pytest.raises(OSError):
        m.clear()
    monkeypatch.undo()
    assert m.states(0, N) == expected
    assert not os.path.exists(str(tmp_path / "map") + TMP)
    m.set(50, 51, DATA)                       # the journal goes on
    crash(m)
    m = d.open()
    assert m.get(50) == DATA and m.states(0, 50) == expected[:50]
    assert m.states(51, N) == expected[51:]


def test_a_crash_after_the_new_map_was_written_but_before_the_rename(tmp_path):
    """The leftover new map is removed at open; the old map is whole."""
    d = Dir(tmp_path)
    m = d.open()
    fill(m)
    expected = m.states(0, N)
    crash(m)
    create(str(tmp_path / "map") + TMP, N)
    m = d.open()
    assert m.states(0, N) == expected
    assert not os.path.exists(str(tmp_path / "map") + TMP)


def test_a_crash_between_forgetting_the_journal_and_the_rename(tmp_path):
    """clear() commits before it forgets the journal: the map file alone is whole."""
    d = Dir(tmp_path)
    m = d.open()
    fill(m)
    expected = m.states(0, N)
    m.commit()
    m._journal.forget()
    crash(m)
    m = d.open()
    assert m.states(0, N) == expected
