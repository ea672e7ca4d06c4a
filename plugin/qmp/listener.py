"""The control socket's file, and what the system says about who connects.

The control server (server.py) calls these; none of them knows QMP:

- ``bind_socket``: create the socket file, mode 0600 before anyone can
  connect, after removing a stale one a dead server left (a live one is
  never stolen);
- ``unlink_socket``: remove it at shutdown, unless another server has
  replaced it since (compared by inode);
- ``peer_allowed``: only our own uid and root may connect, whatever the
  file's mode says (SO_PEERCRED);
- ``free_descriptors``: how many descriptors are left under RLIMIT_NOFILE,
  so that control connections leave enough for nbdkit's NBD clients.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import stat
import struct

log = logging.getLogger(__name__)


def bind_socket(path: str) -> tuple[socket.socket, int]:
    """A non-blocking listening Unix socket at ``path`` (mode 0600), and its inode."""
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ino = None
    try:
        listener.bind(path)
        ino = os.stat(path).st_ino
        # Connections are refused until listen(), so tightening the mode
        # first leaves no window in which others could connect.
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        unlink_socket(path, ino)
        raise
    return listener, ino


def unlink_socket(path: str, ino) -> None:
    """Remove our socket file (inode ``ino``), unless someone else replaced it since."""
    try:
        if ino is not None and os.stat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def peer_allowed(sock: socket.socket, uid: int) -> bool:
    """Whether the connecting process runs as ``uid`` or root; closes ``sock`` if not.

    SO_PEERCRED gives the credentials of the process that connected; others
    are closed before the greeting, with a log line.
    """
    try:
        pid, peer_uid, _ = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError as err:
        log.warning("QMP client refused: no peer credentials error=%s", err)
        sock.close()
        return False
    if peer_uid in (0, uid):
        return True
    log.warning("QMP client refused: uid %d is neither the server's (%d) nor root pid=%d",
                peer_uid, uid, pid)
    sock.close()
    return False


def free_descriptors():
    """File descriptors still free under RLIMIT_NOFILE (None if unlimited or unknown)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        used = len(os.listdir("/proc/self/fd")) - 1     # less listdir's own descriptor
    except OSError:
        return None
    return soft - used


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "control socket path exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as err:
        raise OSError(errno.EADDRINUSE, f"control socket may be in use ({err})", path) from err
    else:
        raise OSError(errno.EADDRINUSE, "control socket is in use by another server", path)
    finally:
        probe.close()
    log.info("Removing stale control socket path=%s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
