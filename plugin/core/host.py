"""Facts about this machine's kernel that tell one boot, or one process, from another.

A crash of this process keeps what the kernel holds (the page cache, other
processes); a reboot does not.  The map journal (disk/mapjournal.py) and a
mirror's target instance (backends/filetarget.py, nbdtarget.py) use these to know which.
"""

import os
import socket
import struct

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id():
    """The kernel's id of this boot (16 bytes); None where the kernel has none."""
    try:
        with open(_BOOT_ID) as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return None


def process_start(pid):
    """When process pid started (clock ticks since boot, /proc/PID/stat field 22);
    None if it is not there.  With the boot id and the pid it names one process
    for the life of the machine: a pid used again has a later start."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: split after it.
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def unix_listeners(path):
    """Inodes of the listening Unix sockets bound to path (from /proc/net/unix)."""
    found = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                # Num RefCount Protocol Flags Type St Inode [Path]; 00010000: listening
                if len(fields) == 8 and fields[7].rstrip("\n") == path and \
                        int(fields[3], 16) & 0x10000:
                    found.add(int(fields[6]))
    except (OSError, ValueError):
        return set()
    return found


def holds_socket(pid, inodes):
    """The socket inode of `inodes` that process pid has open, or None (also when its
    descriptors cannot be read)."""
    folder = "/proc/%d/fd" % pid
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    for name in names:
        try:
            link = os.readlink(os.path.join(folder, name))
        except OSError:
            continue
        if link.startswith("socket:[") and int(link[8:-1]) in inodes:
            return int(link[8:-1])
    return None


def server_instance(fd):
    """The server process at the other end of a Unix socket connection, named for the
    life of the machine: {"kind": "nbd-unix", boot, pid, start, socket}; None if
    it cannot be told (TCP, a server in another pid namespace, descriptors we
    may not read, a server that listened in a parent that has exited).

    The pid is the listener's (SO_PEERCRED); it counts only if that process
    holds the listening socket bound to the path we reached, so a pid used
    again by another process is never taken for the server."""
    boot = boot_id()
    if boot is None:
        return None
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if sock.family != socket.AF_UNIX:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        path = sock.getpeername()
    except OSError:
        return None
    finally:
        sock.close()
    pid = struct.unpack("3i", creds)[0]
    if pid <= 0 or not isinstance(path, str) or not path:
        return None
    start = process_start(pid)
    listener = holds_socket(pid, unix_listeners(path))
    if start is None or listener is None:
        return None
    return {"kind": "nbd-unix", "boot": boot.hex(), "pid": pid, "start": start,
            "socket": listener}
