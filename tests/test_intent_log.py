"""The mirror's write-intent log (plugin/jobs/intent.py), as a pure module: set before
write (a group at a time), clear lazily at checkpoints, and what a restart reads back."""

from plugin.blockcopy.intent import SET_GROUP, IntentLog

MiB = 1 << 20
SIZE = 64 * MiB


def _log(tmp_path, create=True):
    return IntentLog(str(tmp_path / "disk0.intent"), SIZE, MiB, create=create)


def _clear_all(log):
    idle = bytearray(log.nregions)
    log.finish_checkpoint(log.begin_checkpoint(idle), idle)


def _write(log, offset, length):
    token = log.begin(offset, length)
    log.persist(token)
    log.end(token)


def test_a_new_log_has_every_region_set_and_a_checkpoint_clears_idle_ones(tmp_path):
    log = _log(tmp_path)
    assert list(log.regions()) == [(0, SIZE)]
    busy = bytearray(log.nregions)
    busy[5] = 1                                  # the mirror still holds region 5
    log.finish_checkpoint(log.begin_checkpoint(busy), busy)
    assert list(log.regions()) == [(5 * MiB, MiB)]
    log.close()
    assert list(_log(tmp_path, create=False).regions()) == [(5 * MiB, MiB)]


def test_a_first_write_sets_its_aligned_group_with_one_sync(tmp_path):
    log = _log(tmp_path)
    _clear_all(log)
    sets = log.sets
    _write(log, 11 * MiB + 4096, 4096)           # region 11: group [8, 16)
    group = (11 // SET_GROUP) * SET_GROUP
    assert list(log.regions()) == [(group * MiB, SET_GROUP * MiB)]
    assert log.sets == sets + 1
    for r in range(group, group + SET_GROUP):    # the rest of the group costs no sync
        _write(log, r * MiB, 65536)
    assert log.sets == sets + 1
    # Durable before the write was issued: a crash now finds the group set.
    assert list(_log(tmp_path, create=False).regions()) == [(group * MiB, SET_GROUP * MiB)]


def test_a_write_across_groups_sets_both_and_untouched_neighbours_clear_later(tmp_path):
    log = _log(tmp_path)
    _clear_all(log)
    _write(log, 15 * MiB, 2 * MiB)               # regions 15 and 16: groups [8, 24)
    assert list(log.regions()) == [(8 * MiB, 16 * MiB)]
    # The first checkpoint after the write leaves everything (touched since the last one);
    # the next clears what nobody wrote since, written regions included once idle.
    _clear_all(log)
    assert list(log.regions()) == [(8 * MiB, 16 * MiB)]
    _write(log, 9 * MiB, 4096)
    _clear_all(log)
    assert list(log.regions()) == [(9 * MiB, MiB)]
    _clear_all(log)
    assert list(log.regions()) == []


def test_a_group_at_the_end_of_the_disk_stops_at_the_last_region(tmp_path):
    log = IntentLog(str(tmp_path / "odd.intent"), 13 * MiB, MiB, create=True)
    _clear_all(log)
    _write(log, 12 * MiB, 4096)
    assert list(log.regions()) == [(8 * MiB, 5 * MiB)]


def test_overlapping_checkpoints_never_clear_a_region_written_after_they_began(tmp_path):
    """A checkpoint begins while an older one's flush is still in flight: a client
    change between the two must survive both (one touched flag, reset by the
    second begin, would let the first one clear it)."""
    log = _log(tmp_path)
    idle = bytearray(log.nregions)
    _clear_all(log)
    _write(log, 20 * MiB, 4096)                  # group [16, 24) set
    _clear_all(log)                              # touched since the last one: kept
    first = log.begin_checkpoint(idle)           # its flush goes out...
    assert 20 in first.candidates
    _write(log, 20 * MiB + 8192, 4096)           # ...a client writes region 20 again...
    second = log.begin_checkpoint(idle)          # ...and the next checkpoint begins
    assert 20 not in second.candidates
    log.finish_checkpoints([first, second], idle)
    assert (20 * MiB, MiB) in list(log.regions())
    third = log.begin_checkpoint(idle)           # untouched since `second` began
    assert 20 in third.candidates
    log.finish_checkpoints([third], idle)
    assert list(log.regions()) == []


def test_finish_checkpoints_writes_and_syncs_once_for_many(tmp_path):
    log = _log(tmp_path)
    busy = bytearray(log.nregions)
    busy[10:] = b"\x01" * (log.nregions - 10)
    a = log.begin_checkpoint(busy)               # regions 0-9
    busy[10:20] = bytes(10)
    b = log.begin_checkpoint(busy)               # regions 0-19
    idle = bytearray(log.nregions)
    idle[20:] = b"\x01" * (log.nregions - 20)
    assert log.finish_checkpoints([a, b], idle) == 20
    assert list(_log(tmp_path, create=False).regions()) == [(20 * MiB, SIZE - 20 * MiB)]


def test_copied_marks_are_set_regions_apart_and_survive_a_reopen(tmp_path):
    """COPIED (2): set for every rule, written without a sync, told apart by runs().
    A client write into a COPIED region rewrites it as SET on disk first (in the
    file, no sync): COPIED stays exact, so a restart may trust it (same target instance)."""
    log = _log(tmp_path)
    busy = bytearray(log.nregions)
    busy[4:] = b"\x01" * (log.nregions - 4)
    assert log.mark_copied(busy) == 4                # regions 0-3: copies answered
    assert log.set_bytes() == SIZE and log.copied_bytes() == 4 * MiB
    assert list(log.regions()) == [(0, SIZE)]
    assert list(log.runs()) == [(0, 4 * MiB, True), (4 * MiB, SIZE - 4 * MiB, False)]
    sets = log.sets
    token = log.begin(2 * MiB, 4096)                 # a client write into a COPIED region:
    log.persist(token)
    reopened = _log(tmp_path, create=False)          # on disk before the change is issued
    log.end(token)
    assert log.sets == sets                          # still set, no sync
    expected = [(0, 2 * MiB, True), (2 * MiB, MiB, False), (3 * MiB, MiB, True),
                (4 * MiB, SIZE - 4 * MiB, False)]
    assert list(reopened.runs()) == expected and list(log.runs()) == expected
    idle = bytearray(log.nregions)
    log.finish_checkpoint(log.begin_checkpoint(idle), idle)   # region 2 touched: kept
    assert list(log.runs()) == [(2 * MiB, MiB, False)]


def test_a_write_across_copied_and_set_regions_rewrites_the_copied_ones(tmp_path):
    log = _log(tmp_path)
    busy = bytearray(log.nregions)
    busy[2:] = b"\x01" * (log.nregions - 2)
    log.mark_copied(busy)                            # regions 0-1 COPIED, the rest SET
    _write(log, MiB - 4096, 3 * MiB)                 # regions 0-3
    assert list(_log(tmp_path, create=False).runs()) == [(0, SIZE, False)]


def test_mark_copied_skips_regions_a_change_is_in_or_ended_in_since_the_look(tmp_path):
    """The mirror computes its holdings (busy), then marks: a change that ended in
    between (its dirty mark came after the look) or is still running must not be
    marked COPIED; one that ended before the look is the holdings' business."""
    log = _log(tmp_path)
    idle = bytearray(log.nregions)
    _write(log, 0, 4096)                             # region 0: ended before the look
    since = log.change_mark()
    _write(log, MiB, 4096)                           # region 1: ended after the look
    running = log.begin(2 * MiB, 4096)               # region 2: in progress
    log.persist(running)
    assert log.mark_copied(idle, 0, 8, since) == 6   # 0, 3-7
    assert [r for r in range(8) if log._bits[r] == 2] == [0, 3, 4, 5, 6, 7]
    log.end(running)
    on_disk = _log(tmp_path, create=False)
    assert list(on_disk.runs())[:3] == [(0, MiB, True), (MiB, 2 * MiB, False),
                                        (3 * MiB, 5 * MiB, True)]


def test_a_client_rewriting_a_copied_region_makes_no_system_call(tmp_path, monkeypatch):
    """The file is mapped: the COPIED -> SET rewrite on a client's path is a store
    into the page cache (a reader of the file sees it at once), no pwrite, no
    sync, so the client keeps the GIL a busy job thread would hold it back from."""
    import plugin.blockcopy.intent as intent
    log = _log(tmp_path)
    busy = bytearray(log.nregions)
    busy[4:] = b"\x01" * (log.nregions - 4)
    log.mark_copied(busy)                            # regions 0-3 COPIED

    def no_call(*args):
        raise AssertionError("a system call on the client's path")
    for name in ("pwrite", "write", "fdatasync", "fsync"):
        monkeypatch.setattr(intent.os, name, no_call)
    monkeypatch.setattr(intent, "pwrite_all", no_call)
    _write(log, 2 * MiB, 4096)
    _write(log, MiB - 4096, 8192)                    # regions 0 and 1
    monkeypatch.undo()
    assert (tmp_path / "disk0.intent").read_bytes()[:5] == bytes([1, 1, 1, 2, 1])
    assert list(_log(tmp_path, create=False).runs())[:2] == [(0, 3 * MiB, False),
                                                             (3 * MiB, MiB, True)]


def test_a_log_that_cannot_be_mapped_is_written_with_pwrite(tmp_path, monkeypatch):
    """As the map journal: where the file cannot be mapped, the same writes go through
    pwrite, and what a reopen reads is the same."""
    import plugin.blockcopy.intent as intent

    def refuse(*args):
        raise OSError(19, "No such device")
    monkeypatch.setattr(intent.mmap, "mmap", refuse)
    log = _log(tmp_path)
    busy = bytearray(log.nregions)
    busy[4:] = b"\x01" * (log.nregions - 4)
    log.mark_copied(busy)                            # regions 0-3 COPIED
    _write(log, 2 * MiB, 4096)
    monkeypatch.undo()
    assert list(_log(tmp_path, create=False).runs())[:3] == [
        (0, 2 * MiB, True), (2 * MiB, MiB, False), (3 * MiB, MiB, True)]
    log.close()


def test_a_short_file_is_written_whole_and_synced_before_it_is_mapped(tmp_path, monkeypatch):
    """A log never written completely counts every region as set: the file says so
    durably before the log maps it (a mapped short file would grow with zeros,
    clear regions, where a crash could find them)."""
    (tmp_path / "disk0.intent").write_bytes(bytes(10))
    syncs = _Syncs(monkeypatch)
    log = _log(tmp_path, create=False)
    assert syncs.n == 1
    assert list(log.regions()) == [(0, SIZE)]
    assert (tmp_path / "disk0.intent").read_bytes() == b"\x01" * log.nregions
    _clear_all(log)
    log.close()
    assert list(_log(tmp_path, create=False).regions()) == []


def test_a_byte_other_than_0_1_2_reads_as_set(tmp_path):
    (tmp_path / "disk0.intent").write_bytes(bytes([0, 7, 2, 1]) + bytes(60))
    log = _log(tmp_path, create=False)
    assert list(log.runs()) == [(MiB, MiB, False), (2 * MiB, MiB, True), (3 * MiB, MiB, False)]


class _Syncs:
    """Counts the log's fdatasync()s."""

    def __init__(self, monkeypatch):
        import plugin.blockcopy.intent as intent
        self.n = 0
        real = intent.os.fdatasync

        def counting(fd):
            self.n += 1
            real(fd)
        monkeypatch.setattr(intent.os, "fdatasync", counting)


def test_a_set_the_store_cannot_make_durable_before_its_commit_is_owed_not_synced(
        tmp_path, monkeypatch):
    log = _log(tmp_path)
    _clear_all(log)
    fresh = {(3 * MiB, 4096), (5 * MiB, 4096)}          # changes into never-committed space
    log.defer = lambda offset, length: (offset, length) in fresh
    syncs = _Syncs(monkeypatch)
    _write(log, 3 * MiB, 4096)
    assert syncs.n == 0 and log.owed and log.deferred_sets == 1 and log.sets == 0
    group = (3 // SET_GROUP) * SET_GROUP
    # Written without the sync: a kill -9 (same page cache) still finds the group set.
    assert list(_log(tmp_path, create=False).regions()) == [(group * MiB, SET_GROUP * MiB)]
    _write(log, 5 * MiB, 4096)                          # owed region, fresh space: no sync
    assert syncs.n == 0 and log.owed
    log.sync_owed()                                     # the commit hook, before_send
    assert syncs.n == 1 and not log.owed
    log.sync_owed()                                     # nothing owed: no system call
    assert syncs.n == 1


def test_a_change_into_an_owed_region_that_could_be_durable_sooner_syncs_first(
        tmp_path, monkeypatch):
    log = _log(tmp_path)
    _clear_all(log)
    log.defer = lambda offset, length: offset == 3 * MiB
    syncs = _Syncs(monkeypatch)
    _write(log, 3 * MiB, 4096)
    assert syncs.n == 0 and log.owed
    _write(log, 3 * MiB + 65536, 4096)                  # a committed cluster, same region
    assert syncs.n == 1 and not log.owed
    _write(log, 2 * MiB, 2 * MiB)                       # set, nothing owed: no sync
    assert syncs.n == 1


def test_without_defer_and_after_a_checkpoint_nothing_stays_owed(tmp_path, monkeypatch):
    log = _log(tmp_path)
    _clear_all(log)
    syncs = _Syncs(monkeypatch)
    _write(log, 20 * MiB, 4096)                         # no defer: synced as always
    assert syncs.n == 1 and log.sets == 1 and not log.owed
    log.defer = lambda offset, length: True
    _write(log, 40 * MiB, 4096)
    assert log.owed and syncs.n == 1
    _clear_all(log)                                     # both groups touched: nothing cleared
    assert log.owed and syncs.n == 1
    _clear_all(log)                                     # clears them: writes and syncs the log
    assert not log.owed and syncs.n == 2
    _write(log, 60 * MiB, 4096)                         # a clear group again: owed
    log.defer = None
    _write(log, 50 * MiB, 4096)                         # a synced set syncs the owed ones too
    assert not log.owed


def test_client_changes_do_not_wait_for_the_jobs_sync_and_a_set_made_during_it_stays_owed(
        tmp_path, monkeypatch):
    """sync_owed (before_send) and checkpoints fdatasync without the log's lock: a
    client rewriting a COPIED region or making a deferred set meanwhile goes on at
    once (it waited for the disk before, the p99 of a mirror in READY); a deferred
    set made during the sync may have missed it and stays owed."""
    import threading
    import plugin.blockcopy.intent as intent
    log = _log(tmp_path)
    _clear_all(log)
    log.defer = lambda offset, length: True
    _write(log, 3 * MiB, 4096)                          # group 0 set, owed
    busy = bytearray(log.nregions)
    busy[SET_GROUP:] = b"\x01" * (log.nregions - SET_GROUP)
    assert log.mark_copied(busy) == SET_GROUP           # group 0 COPIED (still owed)
    real, entered, release = intent.os.fdatasync, threading.Event(), threading.Event()

    def held(fd):
        entered.set()
        assert release.wait(60)
        real(fd)
    monkeypatch.setattr(intent.os, "fdatasync", held)
    syncing = threading.Thread(target=log.sync_owed)
    syncing.start()
    assert entered.wait(60)                             # the job's sync is in progress
    done = threading.Event()

    def client():
        _write(log, 2 * MiB, 4096)                      # COPIED -> SET: no wait
        _write(log, 40 * MiB, 4096)                     # a clear group: a deferred set
        done.set()
    changes = threading.Thread(target=client)
    changes.start()
    try:
        assert done.wait(30), "the client's changes waited for the job's sync"
    finally:
        release.set()
        syncing.join()
        changes.join()
    assert log.owed and log._owed[40] and log.deferred_sets == 2
    monkeypatch.setattr(intent.os, "fdatasync", real)
    log.sync_owed()
    assert not log.owed
    reopened = _log(tmp_path, create=False)
    assert list(reopened.runs()) == [(0, 2 * MiB, True), (2 * MiB, MiB, False),
                                     (3 * MiB, (SET_GROUP - 3) * MiB, True),
                                     ((40 - 40 % SET_GROUP) * MiB, SET_GROUP * MiB, False)]
