"""The cluster map: which clusters the overlay holds, persisted crash-consistently.

One byte per cluster, in memory as a bytearray and on disk as clusters.map
(byte i is cluster i).  Every byte is independent, so a torn page write after a
power cut leaves each entry either old or new, never garbage.

Durability rule: the map on disk never claims a cluster holds data that did
not reach the disk.  commit() takes a snapshot of the changed pages *before*
it syncs the data file, so everything the snapshot claims was written before
the data sync; only then are the pages written and the map synced.

Between commits, every change is also appended to the map's journal
(mapjournal.py) before set() returns, so an answered write outlives a crash
of the process (not a power loss, which the commit rule covers).

clear() empties the whole map in one step a crash cannot split (a commit
job's complete): a new map file is renamed over the old one.
"""

import errno
import logging
import os
import threading

from ..core.fileio import fsync_dir, pread_all, pwrite_all, unlink_if_there

log = logging.getLogger(__name__)

ABSENT = 0   # the overlay does not hold the cluster: read the base (or zeros)
DATA = 1     # data.img holds the cluster
ZERO = 2     # the cluster reads as zeros, whatever the base holds

PAGE = 4096
TMP = ".tmp"          # clear()'s new map before its rename
# surely_uncommitted() answers from memory: a page's committed bytes are kept
# from the change that made it dirty until the next commit, for at most this
# many pages (16 MiB of clusters each; beyond them it reads the file).
COMMITTED_PAGES = 256

_STATE_BYTES = {ABSENT: b"\x00", DATA: b"\x01", ZERO: b"\x02"}


def create(path, nclusters):
    """A new map file of nclusters ABSENT bytes, written out in full (not sparse)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        chunk = bytes(min(nclusters, 1 << 20))
        offset = 0
        while offset < nclusters:
            n = min(len(chunk), nclusters - offset)
            pwrite_all(fd, memoryview(chunk)[:n], offset)
            offset += n
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocate(fd, length):
    """Make sure the map's blocks exist, so a commit never needs new space (a map
    made by an older server may be sparse).  Content is unchanged."""
    if not length:
        return
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as e:
        log.warning("cannot allocate the cluster map error=%s: a flush on a full "
                    "filesystem may fail", e)


class ClusterMap:
    """In-memory cluster states with dirty-page tracking and a durable commit."""

    def __init__(self, path, nclusters, journal=None, sync_data=None):
        """journal: a MapJournal (replayed here, then appended to by set());
        sync_data(): syncs the data file (commits made by the map itself)."""
        self.nclusters = nclusters
        # The file exists with one byte per cluster (statedir.py makes it,
        # statecheck.py checked it): it is never created, cut or extended here.
        self._path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        unlink_if_there(path + TMP)        # a clear() that a crash cut short before its rename
        try:
            if os.fstat(self._fd).st_size != nclusters:
                raise OSError(errno.EINVAL, "%s: %d bytes, not one per cluster (%d)"
                              % (path, os.fstat(self._fd).st_size, nclusters))
            self._map = bytearray(nclusters)
            if nclusters:
                pread_all(self._fd, self._map, 0)
            _allocate(self._fd, nclusters)
        except BaseException:
            os.close(self._fd)
            raise
        self._dirty = set()
        self._committed = {}                   # dirty page -> its bytes in the file
        self._lock = threading.Lock()          # guards _map writes, _dirty, the journal
        self._commit_lock = threading.Lock()   # one commit at a time
        self._journal = journal
        self._sync_data = sync_data
        self._hooks = ()               # run before a commit syncs the data (add_commit_hook)
        self._committing = 0           # commits between their snapshot and their end
        self._commit_failed = False    # the file may hold pages no commit made durable
        if journal is not None:
            try:
                self._replay(path, journal)
            except BaseException:
                os.close(self._fd)
                raise

    def _replay(self, path, journal):
        """Apply the changes a crashed process made after its last commit; commit them."""
        changes = journal.recover()
        applied = 0
        for first, end, state in changes:
            if not (0 <= first < end <= self.nclusters and state in _STATE_BYTES):
                log.warning("map journal record out of range first=%d end=%d state=%d: "
                            "replay stops there", first, end, state)
                break
            self._apply(first, end, state)
            applied += 1
        if applied:
            log.info("cluster map: replayed changes made after the last flush path=%s "
                     "changes=%d", path, applied)
            self._write(self._snapshot(), self._sync_data)
        journal.start()

    def states(self, first, end):
        """The states of clusters [first, end) as bytes."""
        return bytes(self._map[first:end])

    def get(self, cluster):
        return self._map[cluster]

    def all_in(self, first, end, state):
        """True if every cluster of [first, end) is in state (the request fast path)."""
        if end - first == 1:
            return self._map[first] == state
        return self._map.count(_STATE_BYTES[state], first, end) == end - first

    def run_end(self, first, end):
        """End of the run of equal states that starts at first (at most end)."""
        m = self._map
        state = m[first]
        stop = end
        for other in _STATE_BYTES:
            if other != state:
                i = m.find(_STATE_BYTES[other], first, stop)
                if i != -1:
                    stop = i
        return stop

    def runs(self, first, end):
        """(start, stop, state) for each run of equal states in clusters [first, end)."""
        c = first
        while c < end:
            stop = self.run_end(c, end)
            yield c, stop, self._map[c]
            c = stop

    def set(self, first, end, state):
        """Set clusters [first, end) to state (in memory; durable at the next commit)."""
        if first >= end:
            return
        with self._lock:
            self._apply(first, end, state)
            journal = self._journal
            if journal is None or journal.append(first, end, state):
                return
        self.commit()          # not journaled (full, or it failed): durable now instead

    def _apply(self, first, end, state):
        """Set the states in memory and mark their pages dirty (under _lock, or alone).

        A clean page holds in memory what the file holds (a commit wrote it, or
        nothing changed it since the file was read): as it turns dirty, its bytes
        are what the file keeps until the next commit (_committed)."""
        pages = range(first // PAGE, (end - 1) // PAGE + 1)
        dirty, committed = self._dirty, self._committed
        for page in pages:
            if page not in dirty:
                if len(committed) >= COMMITTED_PAGES:
                    break
                committed[page] = bytes(self._map[page * PAGE:(page + 1) * PAGE])
        self._map[first:end] = _STATE_BYTES[state] * (end - first)
        dirty.update(pages)

    def surely_uncommitted(self, first, end):
        """True if no cluster of [first, end) is data, in memory or in the map
        file, and no commit is under way or failed since the last one that
        succeeded: a change there reaches stable storage only through the next
        commit (the copy-before-write scratch defers its sync to it)."""
        data = _STATE_BYTES[DATA]
        with self._lock:
            if (self._committing or self._commit_failed
                    or self._map.find(data, first, end) >= 0):
                return False
            # What the file holds: a clean page as memory (just looked at), a
            # dirty one as its bytes before it changed, else read (no lock taken
            # and no GIL let go on a client's write for the usual case).
            for page in range(first // PAGE, (end - 1) // PAGE + 1):
                if page not in self._dirty:
                    continue
                lo, hi = max(first, page * PAGE), min(end, (page + 1) * PAGE)
                before = self._committed.get(page)
                if before is not None:
                    if before.find(data, lo - page * PAGE, hi - page * PAGE) >= 0:
                        return False
                elif data in os.pread(self._fd, hi - lo, lo):
                    return False
            return True

    def add_commit_hook(self, fn):
        """fn() runs at every commit before the data sync; an error fails the commit."""
        with self._lock:
            self._hooks = self._hooks + (fn,)

    def remove_commit_hook(self, fn):
        with self._lock:
            # == rather than `is`: each access to a bound method makes a new one.
            self._hooks = tuple(h for h in self._hooks if h != fn)

    def count(self, state):
        return self._map.count(_STATE_BYTES[state])

    def _snapshot(self):
        """[(page, bytes)] of the dirty pages, which are then clean (call under _lock)."""
        pages = sorted(self._dirty)
        self._dirty.clear()
        self._committed.clear()
        return [(p, bytes(self._map[p * PAGE:(p + 1) * PAGE])) for p in pages]

    def _write(self, snapshot, sync_data):
        """Data sync, then the snapshot's pages and a map sync; pages stay dirty on failure."""
        try:
            for hook in self._hooks:
                hook()
            sync_data()
            for page, content in snapshot:
                pwrite_all(self._fd, content, page * PAGE)
            if snapshot:
                os.fdatasync(self._fd)
        except BaseException:
            with self._lock:
                self._dirty.update(page for page, _ in snapshot)
            raise

    def commit(self, sync_data=None):
        """Make the current map durable; sync_data() must sync the data file
        (default: the one given at construction)."""
        sync_data = sync_data or self._sync_data
        with self._commit_lock:
            with self._lock:
                snapshot = self._snapshot()
                journal = self._journal if snapshot else None
                if journal is not None:
                    journal.rotate()
                self._committing += 1
            try:
                self._write(snapshot, sync_data)
            except BaseException:
                with self._lock:
                    self._commit_failed = True
                raise
            finally:
                with self._lock:
                    self._committing -= 1
            with self._lock:
                self._commit_failed = False
                if journal is not None:
                    journal.committed()

    def clear(self):
        """Every cluster ABSENT, durably, in one step a crash cannot split.

        For a commit that completed (the base holds the disk now); nothing
        may change the map meanwhile (the caller quiesced the disk).  The
        map is committed first, so the file on disk is the whole map; the
        journal's records are invalidated (replayed over the empty map they
        would bring clusters back); a map of ABSENT bytes is written and
        synced beside it, then renamed over it: the commit point.  A crash
        before the rename finds the old map whole, after it the empty one.
        Raises OSError; once the rename is done the map in memory is empty
        too, whatever fails after it.
        """
        self.commit()
        tmp = self._path + TMP
        with self._commit_lock:
            unlink_if_there(tmp)
            create(tmp, self.nclusters)
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
            with self._lock:
                try:
                    if self._journal is not None:
                        self._journal.forget()
                    os.rename(tmp, self._path)
                except BaseException:
                    os.close(fd)
                    unlink_if_there(tmp)
                    if self._journal is not None:
                        self._journal.restart()   # the old map stays, and goes on
                    raise
                old, self._fd = self._fd, fd
                self._map = bytearray(self.nclusters)
                self._dirty.clear()
                self._committed.clear()
                if self._journal is not None:
                    self._journal.restart()
            os.close(old)
            fsync_dir(os.path.dirname(self._path) or ".")
        log.info("cluster map cleared path=%s clusters=%d", self._path, self.nclusters)

    def close(self):
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

