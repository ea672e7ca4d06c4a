"""Checks of a state directory, run before anything in it is opened for writing.

A damaged state directory is refused, never "repaired": every check here only
reads.  Each problem is a ``Damaged`` naming the file and what is wrong, in one
line (docs/overlay.md lists every check).

The checks are tables, so a new file or a new meta.json field is one entry:

- ``META_FIELDS``: every key meta.json may hold, the format version that
  introduced it, whether it is required, and its validator;
- ``FILE_CHECKS``: the other files of an overlay (clusters.map, data.img), each a
  function of the validated metadata;
- ``LEFTOVERS``: files whose presence without meta.json means the directory is
  not new (damaged or half made), so no new overlay is created over them.

The base is checked by ``check_base`` against the fingerprint recorded at
creation (``base_fingerprint``): its size always, and for a file a sample
checksum (sha256 of 64 KiB at its start, middle and end) and its mtime.
"""

import hashlib
import json
import logging
import os
import re
import socket
import stat

from .mapjournal import NAMES

log = logging.getLogger(__name__)

FORMAT = "overlay-nbd-state"
VERSION = 4                   # the version this server writes (2: jobs/, 3: map journal,
                              # 4: bitmaps/, checked by bitmapfile.py)
READS = (1, 2, 3, 4)          # the versions it reads (1 to 3 are upgraded in place)
META = "meta.json"
DATA = "data.img"
MAP = "clusters.map"
BITMAPS = "bitmaps"           # persistent dirty bitmaps (bitmapfile.py)
MAX_META_BYTES = 1 << 20
MAX_SIZE = (1 << 63) - 1      # NBD's limit
MIN_CLUSTER, MAX_CLUSTER = 4096, 2 << 20
SAMPLE = 64 * 1024            # bytes per sample of the base's checksum
DEVICE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")
_NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")
_STATE_BYTES = b"\x00\x01\x02"      # ABSENT, DATA, ZERO (clustermap.py)
JOURNALS = NAMES                    # the cluster map's journal files (mapjournal.py)


class Damaged(Exception):
    """A state file that cannot be used; str() is one line naming the file."""

    def __init__(self, path, problem):
        super().__init__("%s: %s" % (path, problem))
        self.path = path
        self.problem = problem


def _show(value, limit=40):
    """A value for a one-line message: repr, cut short, never a newline."""
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _jsonable(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# -- meta.json field validators: value -> None (fine) or the problem ----------

def _positive_size(v):
    if not _is_int(v) or not 0 < v <= MAX_SIZE:
        return "must be a positive integer (bytes) up to 2^63-1"
    return None


def _cluster_size(v):
    if not _is_int(v) or not MIN_CLUSTER <= v <= MAX_CLUSTER or v & (v - 1):
        return "must be a power of 2 from 4096 to 2097152"
    return None


def _address_or_null(v):
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        return "must be null, an absolute path, an NBD URI or an rbd:// address"
    if not _is_nbd(v) and not os.path.isabs(v):
        return "must be null, an absolute path, an NBD URI or an rbd:// address"
    return None


def _active(v):
    if v is None:
        return None
    if (not isinstance(v, dict) or set(v) != {"target"} or not isinstance(v["target"], str)
            or not v["target"]):
        return 'must be null or {"target": ADDRESS}'
    return None


def _base_check(v):
    if v is None:
        return None
    if not isinstance(v, dict) or "size" not in v:
        return 'must be null or {"size": N, ...}'
    if not _is_int(v["size"]) or not 0 <= v["size"] <= MAX_SIZE:
        return "size must be a non-negative integer"
    if "mtime_ns" in v and not _is_int(v["mtime_ns"]):
        return "mtime_ns must be an integer"
    if "sha256" in v and not (isinstance(v["sha256"], str)
                              and re.match(r"^[0-9a-f]{64}$", v["sha256"])):
        return "sha256 must be 64 hex digits"
    if set(v) - {"size", "mtime_ns", "sha256"}:
        return "unknown member %s" % _show(sorted(set(v) - {"size", "mtime_ns", "sha256"})[0])
    return None


def _device(v):
    if not isinstance(v, str) or not DEVICE_RE.match(v):
        return "must be a letter then letters, digits, '_', '.', '-' (at most 32)"
    return None


class Field:
    """One key of meta.json: since which version, required or not, its validator."""

    def __init__(self, name, validate, required=True, since=1):
        self.name = name
        self.validate = validate
        self.required = required
        self.since = since


# format and version are checked first (they say how to read the rest).
META_FIELDS = (
    Field("size", _positive_size),
    Field("cluster_size", _cluster_size),
    Field("base", _address_or_null),
    Field("active", _active),
    Field("base_check", _base_check, required=False),    # absent in older directories
    Field("device", _device, required=False),            # absent in older directories
)


def load_meta(path):
    """Read and validate STATE_DIR/meta.json; returns the dict or raises Damaged."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    if not stat.S_ISREG(st.st_mode):
        raise Damaged(path, "not a regular file")
    if st.st_size > MAX_META_BYTES:
        raise Damaged(path, "%d bytes: too large for a state file (at most %d)"
                      % (st.st_size, MAX_META_BYTES))
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_META_BYTES + 1)
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Damaged(path, "corrupt: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise Damaged(path, "corrupt: not valid JSON (%s)" % str(e).splitlines()[0]) from None
    check_meta(path, meta)
    return meta


def _no_constant(name):
    raise ValueError("invalid literal %s" % name)


def check_meta(path, meta):
    """Validate a parsed meta.json (the META_FIELDS table); raises Damaged."""
    if not isinstance(meta, dict):
        raise Damaged(path, "corrupt: not a JSON object")
    if meta.get("format") != FORMAT:
        raise Damaged(path, "not an overlay state file (format is %s, not %s)"
                      % (_show(meta.get("format")), _show(FORMAT)))
    version = meta.get("version")
    if not _is_int(version) or version not in READS:
        newer = _is_int(version) and version > VERSION
        raise Damaged(path, "format version %s%s; this server reads version %s"
                      % (_show(version), " (written by a newer server)" if newer else "",
                         ", ".join(map(str, READS))))
    known = {"format", "version"}
    for field in META_FIELDS:
        if field.since > version:
            continue
        known.add(field.name)
        if field.name not in meta:
            if field.required:
                raise Damaged(path, "required key '%s' is missing" % field.name)
            continue
        problem = field.validate(meta[field.name])
        if problem:
            raise Damaged(path, "'%s' is %s: %s" % (field.name, _show(meta[field.name]), problem))
    for key in meta:
        if key not in known:
            raise Damaged(path, "unknown key '%s' (format version %d)" % (_show(key, 30).strip('"'),
                                                                        version))


# -- the other files --------------------------------------------------------

def nclusters(meta):
    return (meta["size"] + meta["cluster_size"] - 1) // meta["cluster_size"]


def _regular(path, what):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Damaged(path, "missing (%s)" % what) from None
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    if not stat.S_ISREG(st.st_mode):
        raise Damaged(path, "not a regular file (%s)" % what)
    return st


def _check_map(state_dir, meta, found):
    """clusters.map: one byte per cluster, each 0, 1 or 2; notes where DATA ends."""
    path = os.path.join(state_dir, MAP)
    st = _regular(path, "the cluster map")
    n = nclusters(meta)
    if st.st_size != n:
        raise Damaged(path, "%d bytes, but size %d / cluster_size %d in meta.json needs %d"
                      % (st.st_size, meta["size"], meta["cluster_size"], n))
    last_data = -1
    chunk = 1 << 20
    try:
        with open(path, "rb") as f:
            for start in range(0, n, chunk):
                block = f.read(chunk)
                if len(block) != min(chunk, n - start):
                    raise Damaged(path, "changed while being read")
                bad = block.translate(None, _STATE_BYTES)
                if bad:
                    at = start + block.index(bad[0])
                    raise Damaged(path, "byte 0x%02x at offset %d (cluster %d): "
                                  "must be 0, 1 or 2" % (bad[0], at, at))
                i = block.rfind(b"\x01")
                if i != -1:
                    last_data = start + i
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    found["data_end"] = (0 if last_data < 0
                         else min((last_data + 1) * meta["cluster_size"], meta["size"]))
    found["last_data"] = last_data


def _check_data(state_dir, meta, found):
    """data.img: a regular file, holding every DATA cluster, no larger than the disk."""
    path = os.path.join(state_dir, DATA)
    st = _regular(path, "the overlay's data")
    if st.st_size < found["data_end"]:
        raise Damaged(path, "%d bytes, but clusters.map says cluster %d holds data up to %d"
                      % (st.st_size, found["last_data"], found["data_end"]))
    if st.st_size > meta["size"]:
        raise Damaged(path, "%d bytes, larger than the disk (size %d in meta.json)"
                      % (st.st_size, meta["size"]))


def _check_journals(state_dir, meta, found):
    """clusters.journal.0/.1: regular files where they exist (made at open when missing,
    as in a directory of version 2 or older; their records are checked as they are read)."""
    for name in JOURNALS:
        path = os.path.join(state_dir, name)
        if os.path.lexists(path):
            _regular(path, "the cluster map's journal")


FILE_CHECKS = (
    (MAP, _check_map),
    (DATA, _check_data),      # after MAP: needs where the data ends
    (JOURNALS[0], _check_journals),
)

# Without meta.json, any of these means the directory is not new.
LEFTOVERS = (MAP, DATA, META + ".tmp", BITMAPS) + JOURNALS


def check_files(state_dir, meta):
    """Run FILE_CHECKS on an overlay that is served (not pivoted); raises Damaged."""
    found = {}
    for _, check in FILE_CHECKS:
        check(state_dir, meta, found)


def check_new(state_dir):
    """meta.json is missing: refuse when other state files show the directory is not new."""
    for name in LEFTOVERS:
        if os.path.lexists(os.path.join(state_dir, name)):
            raise Damaged(os.path.join(state_dir, META),
                          "missing, but %s exists: damaged or half made; not creating a new "
                          "overlay over it (move the directory away to start anew)" % name)


# -- the base ---------------------------------------------------------------

def _is_nbd(address):
    """A network base (NBD or RBD): no file to stat; its size is what is checked."""
    return address.startswith(_NBD_SCHEMES + ("rbd://",))


def _sample_digest(backend, size):
    """sha256 of SAMPLE bytes at the start, middle and end of the base."""
    h = hashlib.sha256()
    offsets = sorted({0, max(0, size // 2 - SAMPLE // 2) // 4096 * 4096, max(0, size - SAMPLE)})
    for offset in offsets:
        n = min(SAMPLE, size - offset)
        if n <= 0:
            continue
        buf = bytearray(n)
        backend.readinto(buf, offset)
        h.update(b"%d:" % offset)
        h.update(buf)
    return h.hexdigest()


def base_fingerprint(address, backend):
    """What meta.json records of the base at creation (see check_base)."""
    size = backend.size()
    if _is_nbd(address):
        return {"size": size}
    return {"size": size, "mtime_ns": os.stat(address).st_mtime_ns,
            "sha256": _sample_digest(backend, size)}


def check_base(meta_path, address, backend, recorded):
    """Refuse a base that is not the one the overlay was made over; raises Damaged."""
    if recorded is None:
        log.warning("base not fingerprinted (overlay made by an older server) base=%s", address)
        return
    what = "base %s" % address
    size = backend.size()
    if size != recorded["size"]:
        raise Damaged(what, "%d bytes, but the overlay was made over %d bytes (base_check in "
                      "%s): a different base" % (size, recorded["size"], meta_path))
    if "sha256" in recorded and not _is_nbd(address):
        if _sample_digest(backend, size) != recorded["sha256"]:
            raise Damaged(what, "content differs from when the overlay was made (sample "
                          "checksum, base_check in %s): a different or changed base"
                          % meta_path)
        mtime = os.stat(address).st_mtime_ns
        if recorded.get("mtime_ns") not in (None, mtime):
            log.warning("base modification time changed since the overlay was made "
                        "(samples still match) base=%s", address)


# -- the control socket -----------------------------------------------------

def check_control(path, given=True):
    """control= (given) or the default STATE_DIR/control.sock: a free socket path."""
    parent = os.path.dirname(path) or "."
    if given and not os.path.isdir(parent):
        raise Damaged(path, "control socket's directory %s does not exist" % parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Damaged(path, "exists and is not a socket (control socket); not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return          # nobody listens: stale, replaced when the server starts
    finally:
        probe.close()
    raise Damaged(path, "control socket is in use by another server")
