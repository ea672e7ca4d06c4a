"""The state directory: where the overlay disk lives between runs.

Layout (format version 4, docs/overlay.md "State directory"):

    STATE_DIR/meta.json      what the disk is: size, cluster size, base (and its
                             fingerprint), device name, pivot target
    STATE_DIR/data.img       sparse file, overlay data at the disk's own offsets
    STATE_DIR/clusters.map   one byte per cluster: 0 absent (read the base), 1 data, 2 zero
    STATE_DIR/clusters.journal.0, .1
                             map changes since the last flush, replayed after a
                             crash of the process in the same boot (mapjournal.py)
    STATE_DIR/lock           flock()ed while a server uses the directory
    STATE_DIR/control.sock   default control socket
    STATE_DIR/jobs/          one record per job that outlives the process (plugin/jobs/record.py)
    STATE_DIR/bitmaps/       persistent dirty bitmaps (bitmapfile.py, docs/bitmaps.md)

Version 1 had no jobs/ folder, version 2 no map journal and version 3 no
bitmaps/ folder; such a directory is upgraded in place once every check
passed (meta.json rewritten with version 4).  A newer version is
refused with one line.

Opening an existing directory only reads until every check of statecheck.py
passed: a damaged directory is refused with one line and left as it was.  A new
directory is made whole (clusters.map fully allocated, so metadata never needs
new space later) with meta.json last; a start that fails removes what it made.

meta.json is only ever replaced atomically (write a temporary file, fsync it,
rename it over the old one, fsync the directory), so a crash leaves either the
old or the new version.
"""

import errno
import fcntl
import json
import logging
import os

from ..core.fileio import fsync_dir, unlink_if_there
from . import bitmapfile, clustermap, statecheck
from .statecheck import DATA, FORMAT, MAP, META, VERSION, Damaged

log = logging.getLogger(__name__)

LOCK = "lock"
JOBS = "jobs"
DEFAULT_CLUSTER_SIZE = 65536


class StateError(Exception):
    """A state directory that cannot be used as asked; the message is for the operator."""


def write_json_atomic(path, obj):
    """Replace path with obj as JSON so that a crash leaves the old or the new file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


class StateDir:
    """An opened, locked state directory and its metadata."""

    def __init__(self, path, meta, lock_fd):
        self.path = path
        self.meta = meta
        self._lock_fd = lock_fd

    @property
    def size(self):
        return self.meta["size"]

    @property
    def cluster_size(self):
        return self.meta["cluster_size"]

    @property
    def base(self):
        return self.meta["base"]

    @property
    def device(self):
        """The device name it remembers (None in directories made before it was kept)."""
        return self.meta.get("device")

    @property
    def active(self):
        """None while the overlay is served; a target address after a mirror pivot."""
        return self.meta.get("active")

    def file(self, name):
        return os.path.join(self.path, name)

    def jobs_dir(self):
        """STATE_DIR/jobs, created (durably) on first use: where job records live."""
        path = self.file(JOBS)
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            fsync_dir(self.path)
        return path

    def update(self, **changes):
        """Change metadata durably (atomic replace of meta.json)."""
        meta = dict(self.meta, **changes)
        if meta.get("base") is None:
            meta.pop("base_check", None)     # no base, nothing to recognise it by
        write_json_atomic(self.file(META), meta)
        self.meta = meta
        log.info("state updated path=%s changes=%r", self.path, changes)

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _Undo:
    """What this start created, removed again if the start fails."""

    def __init__(self):
        self.dirs = []       # created directories, outermost first
        self.files = []
        self.lock_path = None

    def undo(self):
        for path in reversed(self.files):
            unlink_if_there(path)
        if self.lock_path:
            unlink_if_there(self.lock_path)
        for path in reversed(self.dirs):
            try:
                os.rmdir(path)
            except OSError:
                pass         # not empty: someone else uses it now


def open_state_dir(path, open_base, base=None, size=None, cluster_size=None, device=None):
    """Open (creating if new) the state directory at path; returns (StateDir, base).

    base, size, cluster_size and device are what the command line gave (None when
    not given).  open_base(address) opens the base read-only (an OSError says why
    not); the opened base is returned (None when the disk has none or is pivoted).
    A new directory needs a base or a size.  A value that conflicts with what the
    directory remembers, or any damage (statecheck.py), is a StateError, raised
    before anything in the directory was changed.
    """
    path = os.path.abspath(path)
    meta_path = os.path.join(path, META)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StateError("overlay=%s: not a directory" % path)
    if base is None and size is None and not os.path.lexists(meta_path):
        statecheck_new(path)
        raise StateError("a new overlay needs base= or size= (%s has no %s)" % (path, META))
    undo = _Undo()
    lock_fd = None
    opened = None
    try:
        _make_dirs(path, undo)
        lock_fd = _lock(path, undo)
        if os.path.lexists(meta_path):
            meta, opened = _open_existing(path, meta_path, open_base, base, size,
                                          cluster_size, device)
        else:
            meta, opened = _create(path, undo, open_base, base, size, cluster_size, device)
        return StateDir(path, meta, lock_fd), opened
    except BaseException:
        if opened is not None:
            opened.close()
        undo.undo()
        if lock_fd is not None:
            os.close(lock_fd)
        raise


def statecheck_new(path):
    try:
        statecheck.check_new(path)
    except Damaged as e:
        raise StateError(str(e)) from None


def _make_dirs(path, undo):
    """Create path and missing parents, noting each one this start made."""
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
            undo.dirs.append(p)
        except FileExistsError:
            pass


def _lock(path, undo):
    """flock STATE_DIR/lock (made if missing); refused while another server holds it."""
    lock_path = os.path.join(path, LOCK)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError("overlay %s is in use by another server" % path) from None
            raise
        # A failed start removes the lock file it made (while holding it): if the
        # file we locked is no longer the one at the path, lock the new one.
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            if created:
                undo.lock_path = lock_path
            return fd
        os.close(fd)


def _open_existing(path, meta_path, open_base, base, size, cluster_size, device):
    try:
        meta = statecheck.load_meta(meta_path)
    except Damaged as e:
        raise StateError(str(e)) from None
    _check_conflicts(path, meta, base, size, cluster_size, device)
    opened = None
    if meta["active"] is None:
        try:
            statecheck.check_files(path, meta)
        except Damaged as e:
            raise StateError(str(e)) from None
        if meta["base"] is not None:
            opened = _open_base(open_base, meta["base"], "remembered in %s" % meta_path)
            try:
                statecheck.check_base(meta_path, meta["base"], opened, meta.get("base_check"))
            except Damaged as e:
                opened.close()
                raise StateError(str(e)) from None
    try:
        bitmapfile.read_bitmaps(path, meta["size"])     # served or pivoted: the disk's own
    except Damaged as e:
        raise StateError(str(e)) from None
    tmp = meta_path + ".tmp"
    if os.path.lexists(tmp):
        log.info("removing a leftover %s (meta.json is valid)", tmp)
        unlink_if_there(tmp)
    if meta["version"] != VERSION:
        # Every check passed: upgrade in place (version 1 differs only in
        # having no jobs/ folder, which is made on first use; version 2 in
        # having no map journal, which the store makes when it opens the map;
        # version 3 in having no bitmaps/ folder, made for the first
        # persistent dirty bitmap).
        old = meta["version"]
        meta = dict(meta, version=VERSION)
        write_json_atomic(meta_path, meta)
        log.info("state upgraded path=%s from_version=%s to_version=%d", path, old, VERSION)
    return meta, opened


def _open_base(open_base, address, why):
    try:
        return open_base(address)
    except OSError as e:
        raise StateError("base=%s (%s): %s" % (address, why, e.strerror or e)) from None


def _check_conflicts(path, meta, base, size, cluster_size, device):
    if base is not None and base != meta["base"]:
        if meta["base"] is None:
            raise StateError("overlay %s has no base (standalone), but base=%s was given"
                             % (path, base))
        raise StateError("overlay %s was created with base=%s, not base=%s"
                         % (path, meta["base"], base))
    if size is not None and size != meta["size"]:
        raise StateError("overlay %s has size %d, not size=%d" % (path, meta["size"], size))
    if cluster_size is not None and cluster_size != meta["cluster_size"]:
        raise StateError("overlay %s has cluster-size %d, not cluster-size=%d"
                         % (path, meta["cluster_size"], cluster_size))
    remembered = meta.get("device")
    if device is not None and remembered is not None and device != remembered:
        raise StateError("overlay %s was created with device=%s, not device=%s"
                         % (path, remembered, device))


def _create(path, undo, open_base, base, size, cluster_size, device):
    """Make a new overlay: clusters.map (allocated), data.img (sparse), then meta.json."""
    try:
        statecheck.check_new(path)
    except Damaged as e:
        raise StateError(str(e)) from None
    if base is None and size is None:
        raise StateError("a new overlay needs base= or size=")
    opened = None
    fingerprint = None
    if base is not None:
        opened = _open_base(open_base, base, "given")
        try:
            fingerprint = statecheck.base_fingerprint(base, opened)
        except OSError as e:
            opened.close()
            raise StateError("base=%s: %s" % (base, e.strerror or e)) from None
        if size is None:
            size = opened.size()
    if size <= 0:
        if opened is not None:
            opened.close()
        raise StateError("base=%s is empty: give size=" % base)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "size": size,
        "cluster_size": cluster_size or DEFAULT_CLUSTER_SIZE,
        "base": base,
        "base_check": fingerprint,
        "device": device or "disk0",
        "active": None,
    }
    try:
        undo.files.append(os.path.join(path, MAP))
        clustermap.create(os.path.join(path, MAP), statecheck.nclusters(meta))
        _new_sparse_file(os.path.join(path, DATA), undo, size)
        undo.files.append(os.path.join(path, META + ".tmp"))
        undo.files.append(os.path.join(path, META))
        write_json_atomic(os.path.join(path, META), meta)
    except OSError as e:
        if opened is not None:
            opened.close()
        raise StateError("cannot create overlay %s: %s" % (path, e.strerror or e)) from None
    log.info("state created path=%s size=%d cluster_size=%d base=%r",
             path, meta["size"], meta["cluster_size"], meta["base"])
    return meta, opened


def _new_sparse_file(file_path, undo, length):
    fd = os.open(file_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    undo.files.append(file_path)
    try:
        os.ftruncate(fd, length)
        os.fsync(fd)
    finally:
        os.close(fd)
