"""Fault injection for the mirror tests, with real tools only.

- FaultSwitch: nbdkit's error filter injects its errors only while a file
  exists (error-file=), so a test turns a fault on and off at run time.
- error_args(): the error filter's arguments for some operations.
- blkdebug_server(): qemu-nbd over QEMU's blkdebug driver, for one error at
  one exact offset (once).
- bad_sector_server(): nbdkit's eval plugin serving an image read-only whose
  read of one exact offset fails once with EIO (qemu-nbd over blkdebug drops
  a structured-reply client on read errors instead: see the tests).
- flaky_flush_server(): nbdkit's eval plugin serving a raw image whose
  flushes fail with EIO while a FaultSwitch is on (the error filter cannot
  fail flushes).
- restart(): a killed server started again on the same socket (a target
  that disconnects and comes back).
- PauseControl: nbdkit's pause filter, a target that stops answering.
- MirrorRig: a base image, the overlay server with its control socket, and a
  raw target file served by nbdkit (optionally through filters); the base
  can itself be served over NBD through the error filter (source faults).
"""

import os
import pathlib
import shlex
import socket
import time

from conftest import Server, make_image
from helpers import Control

MiB = 1 << 20


class FaultSwitch:
    """A file whose existence turns nbdkit error-filter faults on."""

    def __init__(self, path, on=False):
        self.path = pathlib.Path(path)
        if on:
            self.on()

    def on(self):
        self.path.touch()

    def off(self):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @property
    def active(self):
        return self.path.exists()


def error_args(switch=None, error="EIO", ops=("pwrite", "zero"), rate="100%"):
    """Arguments for --filter=error: fail `ops` at `rate` with `error` while switch is on."""
    args = ["error=%s" % error]
    args += ["error-%s-rate=%s" % (op, rate) for op in ops]
    if switch is not None:
        args.append("error-file=%s" % switch.path)
    return args


def injected(server, op="pwrite"):
    """How many errors nbdkit's error filter injected into `op` requests so far."""
    return server.log().count("error into %s" % op)


def blkdebug_server(servers, image, tmp_path, event, offset, errno_value=5, name="blkdebug"):
    """qemu-nbd serving raw `image` through blkdebug: `event` (write_aio, read_aio) at
    byte `offset` fails once with `errno_value`."""
    config = pathlib.Path(tmp_path) / ("%s.cfg" % name)
    config.write_text('[inject-error]\nevent = "%s"\nerrno = "%d"\nsector = "%d"\nonce = "on"\n'
                      % (event, errno_value, offset // 512))
    sock = pathlib.Path(tmp_path) / ("%s.sock" % name)
    argv = ["qemu-nbd", "-k", str(sock), "-t", "-e", "8", "--cache=writeback", "--image-opts",
            "driver=raw,file.driver=blkdebug,file.config=%s,file.image.filename=%s"
            % (config, image)]
    return _track(servers, Server(argv, sock, pathlib.Path(tmp_path) / ("%s.log" % name)))


def bad_sector_server(servers, image, tmp_path, offset, once=True):
    """nbdkit eval serving `image` read-only; reads covering byte `offset` fail with EIO.

    once: only the first such read fails.  Otherwise they fail while the file
    `server.bad_sector` exists (delete it to repair the sector).  Every injected
    error leaves "injected bad sector" in the server's log.
    """
    armed = pathlib.Path(tmp_path) / "bad-sector"
    armed.touch()
    check = ("rm %s 2>/dev/null" if once else "[ -e %s ]") % shlex.quote(str(armed))
    pread = ('if [ "$4" -le {off} ] && [ $(($4 + $3)) -gt {off} ] && {check}; '
             'then echo "EIO injected bad sector" >&2; exit 1; fi; '
             'exec dd if={image} skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none'
             ).format(off=offset, check=check, image=shlex.quote(str(image)))
    size = os.path.getsize(image)
    server = servers.nbdkit("eval", "get_size=echo %d" % size, "pread=" + pread)
    server.bad_sector = armed
    return server


def flaky_flush_server(servers, image, switch, stall=None):
    """nbdkit eval serving raw `image` read-write; flush fails with EIO while `switch` is
    on, and hangs while `stall` (another FaultSwitch) is on."""
    img = shlex.quote(str(image))
    hang = ""
    if stall is not None:
        hang = "while [ -e %s ]; do sleep 0.05; done; " % shlex.quote(str(stall.path))
    return servers.nbdkit(
        "eval",
        "get_size=echo %d" % os.path.getsize(image),
        "pread=exec dd if=%s skip=\"$4\" count=\"$3\" iflag=skip_bytes,count_bytes "
        "status=none" % img,
        "pwrite=exec dd of=%s seek=\"$4\" oflag=seek_bytes conv=notrunc status=none" % img,
        "can_write=exit 0",
        "can_flush=exit 0",
        "flush=%sif [ -e %s ]; then echo 'EIO injected flush error' >&2; exit 1; fi"
        % (hang, shlex.quote(str(switch.path))))


def restart(servers, server, tmp_path):
    """Start `server`'s command again on its socket (after it was killed)."""
    log = pathlib.Path(tmp_path) / ("%s.restarted.log" % pathlib.Path(server.sock).stem)
    return _track(servers, Server(server.argv, server.sock, log))


def _track(servers, server):
    servers.started.append(server)       # killed by pid at the end of the test
    return server.wait_ready()


class PauseControl:
    """nbdkit's pause filter: pause() holds every new request until resume()."""

    def __init__(self, path):
        self.path = str(path)

    def _send(self, command, reply):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self.path)
            s.sendall(command)
            assert s.recv(1) == reply

    def pause(self):
        self._send(b"p", b"P")

    def resume(self):
        self._send(b"r", b"R")


class MirrorRig:
    """Base image, overlay server with a control socket, raw target file served by nbdkit.

    target_filters/target_args: nbdkit filters and their arguments for the target.
    base_filters/base_args: if given, the base is served over NBD through them
    (reads of clusters the overlay does not hold go to that server).
    target_server: a ready server for target_path instead of the nbdkit one.
    """

    def __init__(self, servers, tmp_path, connect, size=4 * MiB, target_filters=(),
                 target_args=(), base_filters=None, base_args=(), target_server=None,
                 base_server=None):
        self.tmp = pathlib.Path(tmp_path)
        self.servers = servers
        self.connect = connect
        self.size = size
        # Data everywhere except one hole, so that every chunk is really copied.
        self.base = make_image(self.tmp / "base.img", size,
                               [(0, size // 2 - 65536), (size // 2 + 65536, size // 2 - 65536)],
                               seed=11)
        self.base_server = base_server
        if base_server is None and base_filters is not None:
            self.base_server = servers.nbdkit("file", self.base, *base_args,
                                              filters=base_filters)
        base = self.base_server.uri if self.base_server is not None else self.base
        self.ctl_path = self.tmp / "ctl.sock"
        self.disk = servers.overlay(self.tmp / "ov", base=base, control=str(self.ctl_path))
        self.target_path = self.tmp / "target.img"
        if not self.target_path.exists():
            with open(self.target_path, "wb") as f:
                f.truncate(size)
        self.target = target_server or servers.nbdkit("file", str(self.target_path),
                                                      *target_args, filters=target_filters)
        self.qmp = Control(self.ctl_path)
        self.h = connect(self.disk.uri)

    def mirror(self, **args):
        args.setdefault("sync", "full")
        return self.qmp("drive-mirror", device="disk0", target=self.target.uri, **args)

    def disk_bytes(self):
        return bytes(self.h.pread(self.size, 0))

    def target_bytes(self):
        return self.target_path.read_bytes()

    def errors(self):
        """The data of every BLOCK_JOB_ERROR seen so far, QEMU's members only (no x- extensions)."""
        return [{k: v for k, v in e["data"].items() if not k.startswith("x-")}
                for e in self.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]

    def close(self):
        self.qmp.close()


def wait_until(predicate, timeout=20, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met within %ss" % timeout)

