"""Storage backends: a raw file, an NBD export or a Ceph RBD image behind one small interface.

The base, the mirror target and a pivoted disk are all backends, so code above
never asks which kind it has (as ovirt-imageio's backends do).  A backend is
picked by the address's scheme in :func:`open_backend` / :func:`open_target`.

Synchronous backend (``open_backend``)::

    size()                              bytes
    readinto(buf, offset)               fill all of buf
    write(buf, offset, fua=False)
    zero(offset, length, may_trim=False, fua=False)
    flush()
    extents(offset, length)             [core.extent.Extent] covering the range
    close()

Asynchronous copy target (``open_target``: filetarget.py, nbdtarget.py,
rbdtarget.py), driven by one job thread::

    wait_open(timeout) -> connected yet?, size(), extents(offset, length),
    in_flight(), multi_conn, losses, on_loss,
    submit_write(buf, offset, tag), submit_zero(offset, length, tag)
    (at most MAX_ZERO bytes), submit_flush(tag),
    wait(timeout) -> [(tag, errno or 0)],
    reconnect(timeout) -> connected?, detach() -> handle or None, close(),
    instance() -> what holds the answered writes, or None (file, NBD),
    open_reader() -> read(length, offset), interrupt(), close() (file, NBD)

Write-through channel (``open_through``, through.py): the synchronous,
deadline-bounded writes of a write-blocking mirror, in client threads.

NBD addresses are any URI libnbd knows (nbd://, nbds:// with TLS, nbd+unix://,
nbds+unix://, tls-psk-file=, tls-certificates=, tls-verify-peer= in the
query, the PSK username as the URI's user); connects are bounded in time and
messages name the URI without secrets (nbdconnect.py).  reconnect_delay: for
that many seconds after a connection is lost, requests wait for a new one.

Errors are OSError with the errno the storage gave, so callers can tell ENOSPC
from EIO.

Addresses: ``nbd://`` and friends (nbd.py, nbdtarget.py), ``rbd://POOL/IMAGE?conf=PATH``
(rbd.py, Ceph's librbd), anything else a file path (file.py).
"""

from .nbdconnect import CONNECT_TIMEOUT, redact  # noqa: F401  (part of the interface)
from .through import open_through  # noqa: F401

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")


RBD_SCHEME = "rbd://"

# The most one submit_zero() may cover (NBD requests carry a 32-bit length).
MAX_ZERO = 1 << 30


def is_nbd_uri(address):
    return address.startswith(NBD_SCHEMES)


def is_rbd_uri(address):
    return address.startswith(RBD_SCHEME)


def open_backend(address, readonly, connections=1, reconnect_delay=0.0, handle=None):
    """A synchronous backend for a file path, an NBD URI or an rbd:// address.

    connections: how many NBD connections a reader may use (one librbd image
    handle serves every thread, so RBD ignores it); handle: a connected
    libnbd handle to adopt, e.g. a mirror target's at the pivot.
    """
    if is_nbd_uri(address):
        from .nbd import NbdBackend
        return NbdBackend(address, readonly, connections, reconnect_delay, handle)
    if is_rbd_uri(address):
        from .rbd import RbdBackend
        return RbdBackend(address, readonly)
    from .file import FileBackend
    return FileBackend(address, readonly)


def open_target(address, reconnect_delay=0.0):
    """An asynchronous copy target for a file path, an NBD URI or an rbd:// address;
    an NBD one connects in the background (wait_open())."""
    if is_rbd_uri(address):
        from .rbdtarget import RbdTarget
        return RbdTarget(address)
    if is_nbd_uri(address):
        from .nbdtarget import NbdTarget
        return NbdTarget(address, reconnect_delay)
    from .filetarget import FileTarget
    return FileTarget(address)
