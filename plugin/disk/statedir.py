"""The state directory: where the overlay disk lives between runs.

Layout (format version 2, see docs/overlay.md):

    STATE_DIR/meta.json      what the disk is: size, cluster size, base, pivot target
    STATE_DIR/data.img       sparse file, overlay data at the disk's own offsets
    STATE_DIR/clusters.map   one byte per cluster: 0 absent (read the base), 1 data, 2 zero
    STATE_DIR/lock           flock()ed while a server uses the directory
    STATE_DIR/control.sock   default control socket
    STATE_DIR/jobs/          one record per job that outlives the process (plugin/jobs/record.py)

Version 1 had no jobs/ folder; a version 1 directory is upgraded in place when
opened (meta.json rewritten with version 2).  A newer version is refused.

meta.json is only ever replaced atomically (write a temporary file, fsync it,
rename it over the old one, fsync the directory), so a crash leaves either the
old or the new version.
"""

import errno
import fcntl
import json
import logging
import os

log = logging.getLogger(__name__)

FORMAT = "overlay-nbd-state"
VERSION = 2
UPGRADABLE = (1,)          # older versions opened and upgraded in place
META = "meta.json"
DATA = "data.img"
MAP = "clusters.map"
LOCK = "lock"
JOBS = "jobs"


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


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        write_json_atomic(self.file(META), meta)
        self.meta = meta
        log.info("state updated path=%s changes=%r", self.path, changes)

    def close(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def open_state_dir(path, base=None, size=None, cluster_size=None, base_size=None):
    """Open (creating if new) the state directory at path and check the config against it.

    base and size are what the command line gave (None when not given); base_size is
    the size of the base when one was given.  A new directory needs a base or a size.
    A value that conflicts with what the directory remembers is an error.
    """
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    lock_fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(lock_fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateError("overlay %s is in use by another server" % path) from None
        raise
    try:
        meta_path = os.path.join(path, META)
        if os.path.exists(meta_path):
            meta = _load_meta(meta_path)
            _check_conflicts(path, meta, base, size, cluster_size)
            if meta["version"] != VERSION:
                old = meta["version"]
                meta = dict(meta, version=VERSION)
                write_json_atomic(meta_path, meta)
                log.info("state upgraded path=%s from_version=%s to_version=%d",
                         path, old, VERSION)
        else:
            meta = _new_meta(base, size, cluster_size, base_size)
            write_json_atomic(meta_path, meta)
            log.info("state created path=%s size=%d cluster_size=%d base=%r",
                     path, meta["size"], meta["cluster_size"], meta["base"])
        return StateDir(path, meta, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _load_meta(meta_path):
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise StateError("%s is corrupt: %s" % (meta_path, e)) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError("%s is not an overlay state file" % meta_path)
    if meta.get("version") != VERSION and meta.get("version") not in UPGRADABLE:
        raise StateError("%s has format version %r, this server reads versions %s to %d"
                         " (a newer server wrote it?)"
                         % (meta_path, meta.get("version"), min(UPGRADABLE), VERSION))
    return meta


def _check_conflicts(path, meta, base, size, cluster_size):
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


def _new_meta(base, size, cluster_size, base_size):
    if base is None and size is None:
        raise StateError("a new overlay needs base= or size=")
    if size is None:
        size = base_size
    return {
        "format": FORMAT,
        "version": VERSION,
        "size": size,
        "cluster_size": cluster_size or 65536,
        "base": base,
        "active": None,
    }
