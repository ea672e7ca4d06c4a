"""nbdkit entry script: serve a copy-on-write overlay disk.

    nbdkit -U disk.sock python plugin/overlaydisk.py overlay=STATE_DIR [base=FILE|NBD_URI]
           [size=SIZE] [control=CTL_SOCK] [device=NAME] [cluster-size=64K]

Every plugin key is listed in docs/plugin-keys.md.  Thread model: parallel.
Every callback is one or two lines forwarding to the Disk (plugin/disk/disk.py);
errors become the errno they carry (nbdkit.set_error); extents become nbdkit's
flag bits here and nowhere else.
"""

import errno
import functools
import importlib
import logging
import os
import sys
import threading

import nbdkit


def _import_package():
    """The package this script belongs to, imported by its full dotted name.

    nbdkit does not put the script's folder on sys.path.  From a clone the
    package is `plugin`; from an installed copy it is `overlay_nbd.plugin`:
    walk up while the folders are packages, put the folder above them on
    sys.path and import the package by name.
    """
    here = os.path.dirname(os.path.realpath(__file__))
    names = []
    while os.path.exists(os.path.join(here, "__init__.py")):
        here, name = os.path.split(here)
        names.insert(0, name)
    if here not in sys.path:
        sys.path.insert(0, here)
    return ".".join(names)


_PACKAGE = _import_package()
ConfigError = importlib.import_module(_PACKAGE + ".config").ConfigError
Service = importlib.import_module(_PACKAGE + ".service").Service
KeptStates = importlib.import_module(_PACKAGE + ".threadstate").KeptStates
ViewDisk = importlib.import_module(_PACKAGE + ".exports").ViewDisk

API_VERSION = 2
_get_ident = threading.get_ident


class _NbdkitLog(logging.Handler):
    def emit(self, record):
        nbdkit.debug(self.format(record))


logging.basicConfig(level=logging.INFO, handlers=[_NbdkitLog()],
                    format="%(name)s: %(levelname)s: %(message)s")
service = Service()


def _stop(e):
    """A configuration error stops nbdkit with one clear line, not a traceback."""
    sys.stderr.write("nbdkit: overlay: error: %s\n" % e)
    sys.stderr.flush()
    os._exit(1)


class _Connection:
    """The handle of one NBD connection: the disk's request methods, bound once,
    and the Python thread states its worker threads keep (plugin/threadstate.py)."""

    __slots__ = ("disk", "read", "write", "kept", "states")

    def __init__(self, disk):
        self.disk = disk
        self.read = disk.read
        self.write = disk.write
        self.states = KeptStates()
        self.kept = self.states.kept


def _io(fn):
    """A request: its thread keeps its Python thread state, and an OSError from
    the disk becomes the client's errno instead of EIO."""
    @functools.wraps(fn)
    def wrapper(h, *args):
        if _get_ident() not in h.kept:         # a thread's first request only
            h.states.keep()
        try:
            return fn(h, *args)
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    return wrapper


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    try:
        service.configure(key, value)
    except ConfigError as e:
        _stop(e)


def config_complete():
    try:
        service.open()
    except ConfigError as e:
        _stop(e)


def after_fork():
    service.start()


def cleanup():
    service.stop()


def open(readonly):
    service.connections.opened()
    view = service.exports.get(nbdkit.export_name()) if service.exports.names() else None
    if view is not None:
        return _Connection(ViewDisk(view, service.disk))
    return _Connection(service.disk)


def list_exports(readonly, is_tls):
    return [""] + service.exports.names()


def default_export(readonly, is_tls):
    return ""


def close(h):
    h.states.release()
    service.connections.closed()


def get_size(h):
    return h.disk.size


def block_size(h):
    return (1, max(4096, h.disk.store.cluster_size), 0xffffffff)


def can_write(h):
    return getattr(h.disk, "writable", True)


def can_flush(h):
    return True


def can_trim(h):
    return getattr(h.disk, "writable", True)


def can_zero(h):
    return getattr(h.disk, "writable", True)


def can_fast_zero(h):
    return getattr(h.disk, "writable", True)


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


@_io
def pread(h, buf, offset, flags):
    h.read(buf, offset)


@_io
def pwrite(h, buf, offset, flags):
    h.write(buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_io
def flush(h, flags):
    h.disk.flush()


@_io
def trim(h, count, offset, flags):
    h.disk.trim(offset, count, bool(flags & nbdkit.FLAG_FUA))


@_io
def zero(h, count, offset, flags):
    h.disk.zero(offset, count, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM),
                fast=bool(flags & nbdkit.FLAG_FAST_ZERO), fua=bool(flags & nbdkit.FLAG_FUA))


@_io
def cache(h, count, offset, flags):
    h.disk.cache(offset, count)


_HOLE_ZERO = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


@_io
def extents(h, count, offset, flags):
    return [(e.offset, e.length, _HOLE_ZERO if e.zero else 0)
            for e in h.disk.extents(offset, count, bool(flags & nbdkit.FLAG_REQ_ONE))]
