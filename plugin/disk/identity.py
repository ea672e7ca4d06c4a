"""Is an address this disk itself?  Refuse mirror targets that are.

A mirror must never write into what it copies from: the base (which must never
be written), a file of the state directory (data.img, clusters.map, ...), or
the disk's own NBD export (it would copy into itself and never converge).
Files and Unix sockets are compared by device and inode, so a symlink, a hard
link or another spelling of the path is caught too; TCP targets by the
addresses this process listens on (read from /proc, so whatever -p/-i nbdkit
was given).
"""

import os
import socket
import urllib.parse

from ..backends import is_nbd_uri


def _file_id(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _nbd_endpoint(uri):
    """("unix", path) or ("tcp", host, port) of an NBD URI; None if it has neither."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme.endswith("+unix"):
        query = urllib.parse.parse_qs(parts.query)
        path = query.get("socket", [None])[0]
        return ("unix", path) if path else None
    if parts.scheme in ("nbd", "nbds"):
        try:
            port = parts.port or 10809
        except ValueError:
            return None
        return "tcp", parts.hostname or "localhost", port
    return None


def _own_socket_inodes():
    """Inodes of the sockets this process holds open."""
    inodes = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            link = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def own_unix_listeners():
    """Paths of the Unix sockets this process listens on (nbdkit's -U)."""
    inodes = _own_socket_inodes()
    paths = []
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = listening
                if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & 0x10000:
                    paths.append(fields[7])
    except OSError:
        pass
    return paths


def own_tcp_listeners():
    """(address, port) of the TCP sockets this process listens on (nbdkit's -p/-i)."""
    inodes = _own_socket_inodes()
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != "0A" or fields[9] not in inodes:
                        continue
                    addr_hex, port_hex = fields[1].split(":")
                    raw = bytes.fromhex(addr_hex)
                    # /proc prints each 32-bit word in host (little-endian) order.
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.append((socket.inet_ntop(family, raw), int(port_hex, 16)))
        except OSError:
            continue
    return found


def _resolves_to(host, port):
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return set()


def _is_own_tcp(host, port):
    listeners = [(a, p) for a, p in own_tcp_listeners() if p == port]
    if not listeners:
        return False
    addresses = _resolves_to(host, port)
    for address, _ in listeners:
        if address in ("0.0.0.0", "::") or address in addresses:
            return True
        if address.startswith("::ffff:") and address[7:] in addresses:
            return True
    return False


def _same_storage(a, b):
    """True if two addresses name the same file, socket or TCP endpoint."""
    if is_nbd_uri(a) != is_nbd_uri(b):
        return False
    if not is_nbd_uri(a):
        fa = _file_id(a)
        return fa is not None and fa == _file_id(b)
    ea, eb = _nbd_endpoint(a), _nbd_endpoint(b)
    if ea is None or eb is None or ea[0] != eb[0]:
        return False
    if ea[0] == "unix":
        fa = _file_id(ea[1])
        return fa is not None and fa == _file_id(eb[1])
    return ea[2] == eb[2] and bool(_resolves_to(ea[1], ea[2]) & _resolves_to(eb[1], eb[2]))


def self_reference(address, state_dir, known=()):
    """Why `address` is this disk itself (a short phrase), or None if it is not.

    known: (address, why) pairs of storage the disk uses (its base, the target
    it was pivoted to).
    """
    for other, why in known:
        if other and _same_storage(address, other):
            return why
    state_files = {}
    for name in os.listdir(state_dir):
        fid = _file_id(os.path.join(state_dir, name))
        if fid is not None:
            state_files[fid] = name
    if is_nbd_uri(address):
        endpoint = _nbd_endpoint(address)
        if endpoint is None:
            return None
        if endpoint[0] == "tcp":
            return "it is this disk's own NBD export" if _is_own_tcp(*endpoint[1:]) else None
        fid = _file_id(endpoint[1])
        if fid is not None and any(_file_id(p) == fid for p in own_unix_listeners()):
            return "it is this disk's own NBD export"
    else:
        fid = _file_id(address)
    if fid is not None and fid in state_files:
        return "it is %s in the disk's state directory" % state_files[fid]
    return None
