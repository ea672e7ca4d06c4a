"""RegionRecord (plugin/disk/bitmaprecord.py): set before write, cleared only when safe."""

from plugin.disk.bitmaprecord import HEADER_BYTES, SET_GROUP, RegionRecord, make_folder

MiB = 1 << 20


def _on_disk(record):
    with open(record.path, "rb") as f:
        return f.read()[HEADER_BYTES:]


def _record(tmp_path, size=64 * MiB):
    folder = str(tmp_path / "bitmaps")
    make_folder(folder)
    return RegionRecord.create(folder, size)


def test_a_first_write_sets_its_group_on_disk_and_a_second_pays_nothing(tmp_path):
    record = _record(tmp_path)
    record.cover(3 * MiB + 10, 4096)
    assert _on_disk(record) == b"\x01" * SET_GROUP + bytes(64 - SET_GROUP)
    assert record.syncs == 1
    record.cover(5 * MiB, 2 * MiB)                 # inside the group: no system call
    assert record.syncs == 1
    record.cover(40 * MiB, 30 * MiB)               # regions 40..63: two more groups
    assert record.syncs == 2
    assert record.set_ranges() == [(0, 16 * MiB), (32 * MiB, 32 * MiB)]


def test_only_regions_idle_for_a_whole_epoch_are_candidates(tmp_path):
    record = _record(tmp_path)
    record.cover(0, 4096)                          # the group 0..15, touched in epoch 1
    first = record.next_epoch()
    assert record.candidates(first) == []          # busy in the epoch that just ended
    record.cover(MiB, 4096)                        # region 1 again, in epoch 2
    second = record.next_epoch()
    assert record.candidates(second) == [r for r in range(SET_GROUP) if r != 1]


def test_a_region_a_bitmap_gained_bits_in_meanwhile_stays_set(tmp_path):
    """(a) clear, then (b) look again: a mark that came in between keeps its region."""
    record = _record(tmp_path)
    record.cover(0, 4096)
    record.next_epoch()
    epoch = record.next_epoch()
    calls = []

    def changed():
        calls.append(1)
        return {2} if len(calls) == 2 else set()   # region 2 marked after (a)
    assert record.clear(record.candidates(epoch), changed) == SET_GROUP - 1
    assert _on_disk(record)[:SET_GROUP] == b"\x00\x00\x01" + bytes(SET_GROUP - 3)
    record.cover(MiB, 4096)                        # cleared: the slow path sets it again
    assert record.syncs == 2 and _on_disk(record)[1] == 1


def test_first_writes_waiting_for_a_sync_are_set_together_by_the_next_one(tmp_path):
    """Group commit: writers queue their groups while the record is busy (here: its
    lock held, as during another writer's fdatasync); the next holder sets all of
    them with one sync, and the others find theirs set and pay nothing."""
    import threading
    record = _record(tmp_path, size=128 * MiB)     # 8 groups of 16 regions
    errors = []

    def write(group):
        try:
            record.cover(group * SET_GROUP * MiB + 4096, 4096)
        except Exception as e:                     # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=write, args=(g,)) for g in range(1, 8)]
    with record._lock:
        for t in threads:
            t.start()
        import time
        deadline = time.monotonic() + 60
        while True:                                # each queued its group, then waits
            with record._queue_lock:
                if len(record._queued) == len(threads):
                    break
            assert time.monotonic() < deadline, "the writers never queued"
            threading.Event().wait(0.001)
    for t in threads:
        t.join()
    assert errors == []
    assert record.syncs == 1
    assert _on_disk(record) == bytes(SET_GROUP) + b"\x01" * (7 * SET_GROUP)
    assert record.set_ranges() == [(16 * MiB, 112 * MiB)]
