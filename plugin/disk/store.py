"""The overlay store: a persistent copy-on-write layer over an optional read-only base.

Data lives in a sparse file at the disk's own offsets (data.img); the cluster
map (clustermap.py) says, per cluster, whether the overlay holds data, holds
zeros, or leaves the cluster to the base.

Concurrency: a cluster that the overlay already holds (DATA) is read and
written in place with no lock.  Every change of a cluster's state (copy-on-write
of a partial write, a full write over an absent cluster, zero, trim, a stream
copying the base in) holds a range lock on the clusters it touches and checks
the state again under the lock, so two partial writes to one absent cluster,
or a write racing a stream, can never overwrite each other's completed bytes.
The map turns DATA only after the cluster's bytes are fully written.
"""

import errno
import logging
import os

from ..backends import is_nbd_uri, is_rbd_uri
from ..core.fileio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from ..core.fileio import fsync_dir, pread_all, pwrite_all, unlink_if_there
from ..core.extent import append_merged
from ..core.threads import Thread
from . import clustermap, mapjournal, statecheck, statedir
from .clustermap import ABSENT, DATA, ZERO
from .rangelock import RangeLock

log = logging.getLogger(__name__)

MAX_EXTENTS = 1024
NEW = ".new"              # suffix of the data.img that empty() renames into place


class OverlayStore:
    """The disk as the overlay (state directory) on top of the base backend."""

    def __init__(self, state, base):
        self.state = state
        self.base = base
        self.size = state.size
        self.cluster_size = cs = state.cluster_size
        self.nclusters = (self.size + cs - 1) // cs
        # data.img exists and was checked (statecheck.py): never created, cut or extended
        # here (empty() replaces it whole; a crash may leave that replacement's temp file).
        unlink_if_there(state.file(statedir.DATA) + NEW)
        self._fd = os.open(state.file(statedir.DATA), os.O_RDWR | os.O_CLOEXEC)
        try:
            journal = mapjournal.MapJournal([state.file(n) for n in mapjournal.NAMES])
            try:
                self.map = clustermap.ClusterMap(state.file(statedir.MAP), self.nclusters,
                                                 journal, self._sync_data)
            except BaseException:
                journal.close()
                raise
        except BaseException:
            os.close(self._fd)
            raise
        self._ranges = RangeLock()
        self._releasing = None    # the thread closing an emptied overlay's old data.img
        self._zeros = bytes(cs)
        self._base_size = base.size() if base is not None else 0

    # -- helpers ---------------------------------------------------------

    def _clusters(self, offset, length):
        """The clusters [first, end) that bytes [offset, offset+length) touch."""
        cs = self.cluster_size
        return offset // cs, (offset + length + cs - 1) // cs

    def _cluster_end(self, cluster):
        return min((cluster + 1) * self.cluster_size, self.size)

    def _base_reads_zero(self, offset, length):
        """True when the base contributes nothing but zeros to the range."""
        if self.base is None or offset >= self.base.size():
            return True
        return all(zero for _, _, zero in self.base.extents(offset, length))

    def _read_below(self, view, offset, state):
        """Fill view with what the cluster reads as without overlay data."""
        if state == ZERO or self.base is None:
            view[:] = self._zeros[:len(view)] if len(view) <= len(self._zeros) else bytes(len(view))
            return
        base_size = self.base.size()
        n = max(0, min(len(view), base_size - offset))
        if n:
            self.base.readinto(view[:n], offset)
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def _fill(self, cluster, start, end):
        """Copy-on-write: write what cluster reads as into data.img for [start, end)."""
        if start >= end:
            return
        buf = bytearray(end - start)
        self._read_below(memoryview(buf), start, self.map.get(cluster))
        pwrite_all(self._fd, buf, start)

    def _write_locked(self, buf, offset, first, end):
        """Write while holding the range lock on clusters [first, end)."""
        cs = self.cluster_size
        stop = offset + len(buf)
        if (end - first == 1 and (offset % cs or stop < self._cluster_end(first))
                and self.map.get(first) != DATA):
            # A write inside one cluster the overlay lacks (a guest's 4K random
            # write): build the whole cluster in one buffer, one base read and
            # one pwrite, instead of a fill of each side and a write between.
            start, cluster_end = first * cs, self._cluster_end(first)
            whole = bytearray(cluster_end - start)
            self._read_below(memoryview(whole), start, self.map.get(first))
            whole[offset - start:stop - start] = buf
            pwrite_all(self._fd, whole, start)
            self.map.set(first, end, DATA)
            return
        if offset % cs and self.map.get(first) != DATA:
            self._fill(first, first * cs, offset)
        last = end - 1
        if stop < self._cluster_end(last) and self.map.get(last) != DATA:
            self._fill(last, stop, self._cluster_end(last))
        pwrite_all(self._fd, buf, offset)
        self.map.set(first, end, DATA)

    # -- the disk --------------------------------------------------------

    def read(self, buf, offset):
        """Fill buf with the disk's bytes at offset."""
        length = len(buf)
        cs = self.cluster_size
        first, end = offset // cs, (offset + length + cs - 1) // cs
        if self.map.all_in(first, end, DATA):
            pread_all(self._fd, buf, offset)
            return
        base = self.base
        if (base is not None and offset + length <= self._base_size
                and self.map.all_in(first, end, ABSENT)):
            base.readinto(buf, offset)
            return
        view = memoryview(buf)
        cs = self.cluster_size
        pos, stop = offset, offset + length
        for _, run_end, state in self.map.runs(first, end):
            piece_end = min(run_end * cs, stop)
            piece = view[pos - offset:piece_end - offset]
            if state == DATA:
                pread_all(self._fd, piece, pos)
            else:
                self._read_below(piece, pos, state)
            pos = piece_end

    def write(self, buf, offset, fua=False):
        cs = self.cluster_size
        first, end = offset // cs, (offset + len(buf) + cs - 1) // cs
        if self.map.all_in(first, end, DATA):
            pwrite_all(self._fd, buf, offset)
        else:
            with self._ranges.hold(first, end):
                self._write_locked(buf, offset, first, end)
        if fua:
            self.flush()

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        """Make the range read as zeros.

        Whole clusters become zero by metadata alone (and are punched out of
        data.img when may_trim allows).  A partial cluster needs a data write,
        unless it already reads as zeros; with fast=True that is refused with
        ENOTSUP before anything changes, as NBD_CMD_FLAG_FAST_ZERO demands.
        """
        cs = self.cluster_size
        stop = offset + length
        first, end = self._clusters(offset, length)
        full_first = (offset + cs - 1) // cs
        full_end = end if stop == self.size else stop // cs
        with self._ranges.hold(first, end):
            # The partial clusters at either end, each within one cluster.
            edges = []
            head_end = min(full_first * cs, stop)
            if offset < head_end:
                edges.append((offset, head_end))
            tail_start = max(full_end * cs, head_end)
            if tail_start < stop:
                edges.append((tail_start, stop))
            writes = [e for e in edges if not self._reads_zero(*e)]
            if writes and fast:
                raise OSError(errno.ENOTSUP, "zeroing part of a cluster is not fast")
            if full_first < full_end:
                if may_trim:
                    self._punch_data(full_first, full_end)
                self.map.set(full_first, full_end, ZERO)
            for start, e in writes:
                c = start // cs
                if self.map.get(c) == DATA:
                    pwrite_all(self._fd, self._zeros[:e - start], start)
                else:
                    self._write_locked(self._zeros[:e - start], start, c, c + 1)
        if fua:
            self.flush()

    def _reads_zero(self, start, stop):
        state = self.map.get(start // self.cluster_size)
        if state == ZERO:
            return True
        if state == ABSENT:
            return self._base_reads_zero(start, stop - start)
        return False

    def _punch_data(self, first, end):
        """Release data.img space of the DATA clusters in [first, end)."""
        cs = self.cluster_size
        for c, run_end, state in self.map.runs(first, end):
            if state == DATA:
                start = c * cs
                length = min(run_end * cs, self.size) - start
                try:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, start, length)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise

    def trim(self, offset, length, fua=False):
        """Discard whole clusters (they read as zeros after); partial clusters are kept."""
        cs = self.cluster_size
        stop = offset + length
        full_first = (offset + cs - 1) // cs
        full_end = (self.nclusters if stop == self.size else stop // cs)
        if full_first < full_end:
            with self._ranges.hold(full_first, full_end):
                self._punch_data(full_first, full_end)
                self.map.set(full_first, full_end, ZERO)
        if fua:
            self.flush()

    def _sync_data(self):
        os.fdatasync(self._fd)

    def flush(self):
        """Make every completed write durable: data first, then the map that names it."""
        self.map.commit()

    def defers_durability(self, offset, length):
        """True if a change of [offset, offset+length) cannot reach stable
        storage before the next flush: every cluster it touches is one the map
        never committed as data (a copy-on-write write goes to space no
        committed map entry names; disk/clustermap.py)."""
        return self.map.surely_uncommitted(*self._clusters(offset, length))

    def data_file(self, offset, length):
        """data.img's descriptor if the overlay holds the whole range there (at the
        same offsets: a copy may go file to file), else None."""
        first, end = self._clusters(offset, length)
        return self._fd if self.map.all_in(first, end, DATA) else None

    def add_commit_hook(self, fn):
        """fn() runs before every commit (flush, or a full journal) syncs the data."""
        self.map.add_commit_hook(fn)

    def remove_commit_hook(self, fn):
        self.map.remove_commit_hook(fn)

    def cache(self, offset, length):
        """Prefetch: ask the kernel to read ahead the overlay's part of the range."""
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset, length, req_one=False):
        """[Extent] from offset, merged across overlay and base (at most MAX_EXTENTS)."""
        result = []
        cs = self.cluster_size
        stop = min(offset + length, self.size)
        first, end = self._clusters(offset, stop - offset)
        pos = offset
        for _, run_end, state in self.map.runs(first, end):
            piece_end = min(run_end * cs, stop)
            if state == DATA:
                append_merged(result, pos, piece_end - pos, False)
            elif state == ZERO or self.base is None:
                append_merged(result, pos, piece_end - pos, True)
            else:
                for e in self.base.extents(pos, piece_end - pos):
                    append_merged(result, e.offset, e.length, e.zero)
            pos = piece_end
            if req_one or len(result) >= MAX_EXTENTS:
                break
        return result

    # -- jobs ------------------------------------------------------------

    def populate(self, offset, length):
        """Copy what the base holds for the range into the overlay (stream).

        Clusters the overlay holds already are left alone, so a client write
        is never overwritten by older base data.  Returns the bytes copied.
        """
        first, end = self._clusters(offset, length)
        copied = 0
        with self._ranges.hold(first, end):
            for c, run_end, state in list(self.map.runs(first, end)):
                if state != ABSENT:
                    continue
                start = c * self.cluster_size
                stop = min(run_end * self.cluster_size, self.size)
                if self._base_reads_zero(start, stop - start):
                    self.map.set(c, run_end, ZERO)
                else:
                    buf = bytearray(stop - start)
                    self._read_below(memoryview(buf), start, ABSENT)
                    pwrite_all(self._fd, buf, start)
                    self.map.set(c, run_end, DATA)
                    copied += stop - start
        return copied

    @property
    def has_base(self):
        return self.base is not None

    def overlay_runs(self):
        """(offset, length) of every run of clusters the overlay holds (sync=top)."""
        cs = self.cluster_size
        for c, run_end, state in self.map.runs(0, self.nclusters):
            if state != ABSENT:
                yield c * cs, min(run_end * cs, self.size) - c * cs

    def next_absent(self, offset):
        """(offset, length) of the first run of absent clusters at or after offset, or None."""
        cs = self.cluster_size
        for c, run_end, state in self.map.runs(offset // cs, self.nclusters):
            if state == ABSENT:
                start = max(offset, c * cs)
                return start, min(run_end * cs, self.size) - start
        return None

    def absent_bytes(self):
        """How much of the disk still reads from the base (stream's remaining work)."""
        return min(self.map.count(ABSENT) * self.cluster_size, self.size)

    def drop_base(self):
        """The overlay stands alone (a stream finished): forget the base, durably.

        Refused while any cluster still reads from the base.  The map is
        committed first, so it never points at a base that is gone.
        """
        absent = self.map.count(ABSENT)
        if absent:
            raise OSError(errno.EIO, "%d clusters still absent: the base is still needed"
                          % absent)
        self.flush()
        self.state.update(base=None)
        old, self.base, self._base_size = self.base, None, 0
        if old is not None:
            old.close()

    # -- commit (plugin/jobs/commit.py) ------------------------------------

    @property
    def base_address(self):
        """The base's address as meta.json records it (None without a base)."""
        return self.state.base

    def loosen_base_check(self):
        """A commit job is about to write the base: meta.json keeps only its size.

        The base's sample checksum and mtime (statecheck.check_base) change
        as the job writes, and a start after a crash must still accept it;
        record_base() records them anew once nothing writes the base.
        """
        check = self.state.meta.get("base_check")
        if check and set(check) != {"size"}:
            self.state.update(base_check={"size": check["size"]})

    def record_base(self):
        """The base changed (a commit wrote it) and nothing writes it now: record
        its fingerprint anew, so that the next start accepts it.  A file is
        synced first, so the fingerprint is of what a power cut keeps."""
        address = self.state.base
        if address is None or self.base is None:
            return
        if not (is_nbd_uri(address) or is_rbd_uri(address)):
            fd = os.open(address, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.state.update(base_check=statecheck.base_fingerprint(address, self.base))

    def empty(self, base):
        """The overlay gives up every cluster: a commit completed, the base holds the disk.

        Call with no request running.  The map's switch (ClusterMap.clear) is
        the commit point; then data.img's blocks are released and every read
        goes to `base`, a fresh connection to the same base that the caller
        opened after the commit's writes (no cache of the old one survives:
        an RBD image's, a server's that does not offer multi-conn).
        """
        try:
            self.map.clear()
        finally:
            old, self.base, self._base_size = self.base, base, base.size()
            if old is not None:
                old.close()
        try:
            self._fresh_data_file()
        except OSError as e:
            log.warning("overlay emptied, but its data space was not released path=%s "
                        "error=%s", self.state.path, e)
        log.info("overlay emptied path=%s base=%s", self.state.path, self.state.base)

    def _fresh_data_file(self):
        """A new empty data.img renamed over the old one; the old one's blocks and
        page cache are freed by its last close, in a thread of its own (punching
        1 GiB out of the file took ~0.2 s that the job's completion waited for).
        The map names no cluster any more (the commit point passed), so a crash
        before or after the rename finds a data.img that nothing refers to."""
        path = self.state.file(statedir.DATA)
        tmp = path + NEW
        unlink_if_there(tmp)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.size)
            os.fsync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            unlink_if_there(tmp)
            raise
        old, self._fd = self._fd, fd
        fsync_dir(self.state.path)
        self._releasing = Thread(target=os.close, args=(old,), daemon=True,
                                 name="overlay-release")
        self._releasing.start()

    def allocation(self):
        """Counts of clusters by state, for query-block."""
        return {
            "cluster-size": self.cluster_size,
            "clusters": self.nclusters,
            "data-clusters": self.map.count(DATA),
            "zero-clusters": self.map.count(ZERO),
            "absent-clusters": self.map.count(ABSENT),
        }

    def close(self):
        self.map.close()
        if self._releasing is not None:
            self._releasing.join()
            self._releasing = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.base is not None:
            self.base.close()
