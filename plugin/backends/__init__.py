"""Storage backends: a raw file or an NBD export behind one small interface.

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

Asynchronous mirror target (``open_target``, see target.py)::

    wait_open(timeout) -> connected yet?, size(), extents(offset, length),
    in_flight(), multi_conn, losses, on_loss,
    submit_write(buf, offset, tag), submit_zero(offset, length, tag),
    submit_flush(tag), wait(timeout) -> [(tag, errno or 0)],
    reconnect(timeout) -> connected?, detach() -> handle or None, close()

NBD addresses are any URI libnbd knows (nbd://, nbds:// with TLS, nbd+unix://,
nbds+unix://, tls-psk-file=, tls-certificates=, tls-verify-peer= in the
query, the PSK username as the URI's user); connects are bounded in time and
messages name the URI without secrets (nbdconnect.py).  reconnect_delay: for
that many seconds after a connection is lost, requests wait for a new one.

Errors are OSError with the errno the storage gave, so callers can tell ENOSPC
from EIO.
"""

NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://")


def is_nbd_uri(address):
    return address.startswith(NBD_SCHEMES)


def open_backend(address, readonly, connections=1, reconnect_delay=0.0, handle=None):
    """A synchronous backend for a file path or an NBD URI (handle: a connected
    libnbd handle to adopt, e.g. a mirror target's at the pivot)."""
    if is_nbd_uri(address):
        from .nbd import NbdBackend
        return NbdBackend(address, readonly, connections, reconnect_delay, handle)
    from .file import FileBackend
    return FileBackend(address, readonly)


def open_target(address, reconnect_delay=0.0):
    """An asynchronous mirror target for a file path or an NBD URI; an NBD one
    connects in the background (wait_open())."""
    from .target import FileTarget, NbdTarget
    if is_nbd_uri(address):
        return NbdTarget(address, reconnect_delay)
    return FileTarget(address)
