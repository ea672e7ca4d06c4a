"""Ceph RBD images through librbd (Debian's python3-rados / python3-rbd).

An address is ``rbd://POOL/IMAGE?conf=PATH`` or ``rbd://POOL/NAMESPACE/IMAGE?...``
with optional query keys:

    conf=PATH        ceph.conf to read (default: librados' own search path)
    id=CLIENT        the client name without "client." (default: admin)
    timeout=SECONDS  bound on connecting and on each OSD / monitor operation
                     (default 30; 0 waits for ever, as QEMU's rbd driver does)

The conf path must be absolute: nbdkit runs in / once it has forked.

RbdBackend has the synchronous backend interface (backends/__init__.py):
size, readinto, write, zero, flush, extents, close.  RbdTarget
(rbdtarget.py) is a copy target over librbd's asynchronous I/O, with the
interface of backends/__init__.py.  open_backend / open_target pick them
for an rbd:// address.

A bad address is ValueError from parse_uri (the configuration says which
key) and OSError(EINVAL) from the constructors (like any failure to open).

Errors are OSError with the errno Ceph gave.  A pool quota fails writes with
EDQUOT; it is reported as ENOSPC so that the enospc policy treats a full pool
like a full disk.  A request that timed out (the OSD is stopped or
unreachable for longer than timeout) fails with ETIMEDOUT.

librbd's Image is thread safe and its synchronous calls release the GIL, so
nbdkit's worker threads share one image handle; librbd itself runs many
requests in parallel.
"""

import dataclasses
import errno
import logging
import urllib.parse

from ..core.errors import errno_name
from ..core.extent import append_merged
from ..core.threads import Thread

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30
MAX_ZERO = 1 << 30
# How long close() waits for librbd before it lets the close go on alone: a
# hung OSD with timeout=0 would hold a cancel or a shutdown for ever.
CLOSE_WAIT = 2.0


@dataclasses.dataclass
class RbdAddress:
    """A parsed rbd:// address."""

    pool: str
    image: str
    namespace: str = ""
    conf: str | None = None
    client_id: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def __str__(self):
        path = "/".join(p for p in (self.pool, self.namespace, self.image) if p)
        return "rbd://" + path


def parse_uri(address):
    """An RbdAddress; ValueError with a one-line reason for a bad address."""
    u = urllib.parse.urlsplit(address)
    if u.scheme != "rbd":
        raise ValueError("not an rbd:// address: %r" % address)
    parts = [urllib.parse.unquote(p) for p in (u.netloc + u.path).split("/")]
    if len(parts) == 2:
        pool, image, namespace = parts[0], parts[1], ""
    elif len(parts) == 3:
        pool, namespace, image = parts
    else:
        raise ValueError("rbd address must be rbd://POOL/IMAGE or rbd://POOL/NAMESPACE/IMAGE: %r"
                         % address)
    if not pool or not image or (len(parts) == 3 and not namespace):
        raise ValueError("rbd address has an empty pool, namespace or image: %r" % address)
    try:
        query = urllib.parse.parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError:
        raise ValueError("rbd address has a malformed query: %r" % address) from None
    unknown = set(query) - {"conf", "id", "timeout"}
    if unknown:
        raise ValueError("rbd address has unknown option(s) %s (known: conf, id, timeout)"
                         % ", ".join(sorted(unknown)))
    for k, v in query.items():
        if len(v) != 1 or not v[0]:
            raise ValueError("rbd address option %s needs exactly one non-empty value" % k)
    timeout = DEFAULT_TIMEOUT
    if "timeout" in query:
        try:
            timeout = int(query["timeout"][0])
            if timeout < 0:
                raise ValueError
        except ValueError:
            raise ValueError("rbd address timeout must be whole seconds >= 0: %r"
                             % query["timeout"][0]) from None
    conf = query.get("conf", [None])[0]
    if conf is not None and not conf.startswith("/"):
        raise ValueError("rbd address conf=%s must be an absolute path (the server runs in /)"
                         % conf)
    return RbdAddress(pool, image, namespace, query.get("conf", [None])[0],
                      query.get("id", [None])[0], timeout)


def ceph_errno(e):
    """The positive errno of a rados/rbd exception (EDQUOT reads as ENOSPC)."""
    n = getattr(e, "errno", None)
    if not isinstance(n, int) or n == 0:
        import rbd
        n = errno.ENOENT if isinstance(e, rbd.ImageNotFound) else errno.EIO
    n = abs(n)
    return errno.ENOSPC if n == errno.EDQUOT else n


def _os_error(e, what):
    n = ceph_errno(e)
    return OSError(n, "%s: %s" % (what, e or errno_name(n)))


def _parse(address):
    """An RbdAddress from a string (OSError EINVAL if bad) or as given."""
    if not isinstance(address, str):
        return address
    try:
        return parse_uri(address)
    except ValueError as e:
        raise OSError(errno.EINVAL, str(e)) from None


def _ceph_errors():
    import rados
    import rbd
    return (rados.Error, rbd.Error)


class _Connection:
    """A cluster connection, an I/O context and one open image."""

    def __init__(self, address, readonly):
        import rados
        import rbd
        self.addr = _parse(address)
        a = self.addr
        # No librbd cache: a write fails or succeeds itself (with the cache a
        # failure would surface at a later flush), as with the file and NBD backends.
        #
        # librbd copies each write at submit time (rbd_disable_zero_copy_writes
        # stays true): with zero-copy writes it holds a completion until the
        # messenger lets go of the caller's memory, which it never does for a
        # hung OSD or a blocklisted client, so a write would neither time out
        # nor fail with ESHUTDOWN, and closing the image would hang.
        conf = {"rbd_cache": "false"}
        if a.timeout:
            t = str(a.timeout)
            conf.update({"rados_osd_op_timeout": t, "rados_mon_op_timeout": t,
                         "client_mount_timeout": t})
        self.cluster = self.ioctx = self.image = None
        try:
            self.cluster = rados.Rados(conffile=a.conf or "", rados_id=a.client_id, conf=conf)
            self.cluster.connect(timeout=a.timeout or 0)
            self.ioctx = self.cluster.open_ioctx(a.pool)
            if a.namespace:
                self.ioctx.set_namespace(a.namespace)
            # Without "full try" librados holds writes to a full pool (a quota or
            # a full cluster) until it has room, or until the op timeout; with it
            # the OSD answers at once: EDQUOT (quota) or ENOSPC.
            self.ioctx.set_osdmap_full_try()
            self.image = rbd.Image(self.ioctx, a.image, read_only=readonly)
        except _ceph_errors() as e:
            self.close()
            raise _os_error(e, "cannot open %s" % a) from None
        self.readonly = readonly
        self.size = self.image.size()
        self.whole_object = bool(self.image.features() & rbd.RBD_FEATURE_FAST_DIFF)

    def call(self, what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _ceph_errors() as e:
            raise _os_error(e, "%s %s" % (what, self.addr)) from None

    def readinto(self, buf, offset):
        view = memoryview(buf).cast("B")
        data = self.call("read from", self.image.read, offset, len(view))
        if len(data) != len(view):
            raise OSError(errno.EIO, "short read at offset %d from %s" % (offset, self.addr))
        view[:] = data

    def extents(self, offset, length):
        """[Extent] covering the range, from diff_iterate.

        With fast-diff the object map answers at object granularity (no I/O
        per object); without it librbd asks each object for its extents.
        Ranges diff_iterate does not report read as zeros, and so does
        everything past the end of the image.
        """
        end = min(offset + length, self.size)
        found = []
        if end > offset:
            def cb(o, n, exists):
                found.append((o, n, exists))
                return 0
            self.call("extents of", self.image.diff_iterate, offset, end - offset, None, cb,
                      include_parent=True, whole_object=self.whole_object)
        found.sort()
        result = []
        pos = offset
        for o, n, exists in found:
            o, e = max(o, pos), min(o + n, end)
            if e <= o:
                continue
            append_merged(result, pos, o - pos, True)
            append_merged(result, o, e - o, not exists)
            pos = e
        append_merged(result, pos, end - pos, True)
        if offset + length > end:
            start = max(end, offset)
            append_merged(result, start, offset + length - start, True)
        return result

    def close_within(self, seconds):
        """close() in a thread, waited for at most seconds (then it goes on alone)."""
        t = Thread(target=self.close, name="rbd-close", daemon=True)
        t.start()
        t.join(seconds)
        if t.is_alive():
            log.warning("closing %s takes longer than %ss (cluster not answering?); going on",
                        self.addr, seconds)

    def close(self):
        for obj in (self.image, self.ioctx):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            except Exception:
                pass
        self.cluster = self.ioctx = self.image = None


class RbdBackend:
    """An RBD image as a base or a pivoted disk; safe to call from many threads."""

    def __init__(self, address, readonly):
        self.address = address
        self._c = _Connection(address, readonly)
        log.info("open backend kind=rbd image=%s size=%d readonly=%s", self._c.addr,
                 self._c.size, readonly)

    def size(self):
        return self._c.size

    def readinto(self, buf, offset):
        self._c.readinto(buf, offset)

    def write(self, buf, offset, fua=False):
        self._c.call("write to", self._c.image.write, _whole_buffer(buf), offset)
        if fua:
            self.flush()

    def zero(self, offset, length, may_trim=False, fua=False):
        # write_zeroes (not discard): librbd skips partial-object discards,
        # which would leave old data there.  It deallocates whole objects.
        while length:
            n = min(length, MAX_ZERO)
            self._c.call("zero", self._c.image.write_zeroes, offset, n)
            offset += n
            length -= n
        if fua:
            self.flush()

    def flush(self):
        self._c.call("flush", self._c.image.flush)

    def extents(self, offset, length):
        return self._c.extents(offset, length)

    def close(self):
        """Close the image (in the background after CLOSE_WAIT if the cluster hangs)."""
        self._c.close_within(CLOSE_WAIT)


def _whole_buffer(buf):
    """buf as bytes or bytearray for librbd, without a copy when it is a whole bytearray."""
    if isinstance(buf, (bytes, bytearray)):
        return buf
    if isinstance(buf, memoryview):
        obj = buf.obj
        # A contiguous view as long as its bytearray is all of it.
        if isinstance(obj, bytearray) and buf.contiguous and buf.nbytes == len(obj):
            return obj
    return bytes(buf)
