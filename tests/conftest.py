"""Shared fixtures: start real nbdkit servers on sockets in a temp folder.

Every process a test starts is tracked and killed by pid at the end of the
test; nothing else is ever signalled.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "overlaydisk.py"
LAUNCHER = REPO / "scripts" / "nbdkit-overlay"   # nbdkit + the plugin with the tuned options
sys.path.insert(0, str(REPO / "tests"))


def _accepts(path):
    """True if a Unix socket at path accepts a connection (closed at once)."""
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def nbd_uri(sock):
    return "nbd+unix:///?socket=%s" % sock


class Server:
    """An nbdkit process serving on a Unix socket."""

    def __init__(self, argv, sock, log_path, env=None, control=None):
        self.argv = argv
        self.control = control
        self.sock = str(sock)
        self.uri = nbd_uri(sock)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, timeout=30):
        """Wait for the NBD socket, then (our plugin) for the control socket to accept.

        nbdkit binds the NBD socket before it forks; the control server starts
        after the fork, so a test must not race it.
        """
        deadline = time.monotonic() + timeout
        for path, accepting in ((self.sock, False), (self.control, True)):
            while path is not None:
                if os.path.exists(path) and (not accepting or _accepts(path)):
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError("nbdkit exited with %s:\n%s"
                                       % (self.proc.returncode, self.log()))
                if time.monotonic() > deadline:
                    raise RuntimeError("nbdkit did not open %s:\n%s" % (path, self.log()))
                time.sleep(0.02)
        return self

    def log(self):
        self._log.flush()
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout=20):
        """SIGTERM and wait: nbdkit must exit promptly on its own."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("nbdkit did not exit on SIGTERM:\n" + self.log())
        self._cleanup_socket()
        return self.proc.returncode

    def kill9(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup_socket()

    def _cleanup_socket(self):
        self._log.close()
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass


class Servers:
    """Factory fixture: start servers; all are killed (by pid) after the test."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.started = []
        self._n = 0

    def _next(self, name):
        self._n += 1
        return self.tmp / ("%s%d.sock" % (name, self._n)), self.tmp / ("%s%d.log" % (name, self._n))

    def overlay(self, overlay, base=None, size=None, filters=(), wait=True, options=(),
                **params):
        """nbdkit serving our plugin; params are extra key=value (use '_' for '-'),
        options extra nbdkit options (e.g. ["--threads", "1"])."""
        sock, log = self._next("overlay")
        argv = [str(LAUNCHER), "-f", "-v", "-U", str(sock), *options]
        for f in filters:
            argv += ["--filter=" + f]
        argv += ["overlay=%s" % overlay]
        if base is not None:
            argv.append("base=%s" % base)
        if size is not None:
            argv.append("size=%s" % size)
        for k, v in params.items():
            argv.append("%s=%s" % (k.replace("_", "-"), v))
        control = params.get("control") or os.path.join(str(overlay), "control.sock")
        return self._start(argv, sock, log, wait, control)

    def nbdkit(self, plugin, *args, filters=(), wait=True):
        """nbdkit serving any plugin, e.g. nbdkit("file", path, filters=["error"])."""
        sock, log = self._next(plugin.replace("/", "_"))
        argv = ["nbdkit", "-f", "-U", str(sock)]
        for f in filters:
            argv += ["--filter=" + f]
        argv += [plugin, *args]
        return self._start(argv, sock, log, wait)

    def restart(self, server, wait=True):
        """Start the same command again on the same socket (after stop or kill9)."""
        _, log = self._next("restart")
        return self._start(server.argv, server.sock, log, wait, server.control)

    def _start(self, argv, sock, log, wait, control=None):
        server = Server(argv, sock, log, control=control)
        self.started.append(server)
        return server.wait_ready() if wait else server

    def cleanup(self):
        for s in self.started:
            if s.proc.poll() is None:
                try:
                    os.killpg(s.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                s.proc.wait()


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.cleanup()


@pytest.fixture
def background():
    """Start jobctl in the background: background(socket or server, *args) -> helpers.Background;
    every one is killed (by pid) after the test."""
    from helpers import Background
    started = []

    def start(where, *args):
        proc = Background(where, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def local_disks(tmp_path, servers):
    """Make helpers.LocalDisk (our disk in this process, its jobs on a clock the test
    steps): local_disks(base, **plugin_keys); every one is stopped after the test, before
    the servers it may use (its base, its target)."""
    from helpers import LocalDisk
    made = []

    def make(base, **keys):
        disk = LocalDisk(tmp_path, base, **keys)
        made.append(disk)
        return disk

    yield make
    for disk in made:
        disk.close()


@pytest.fixture(scope="session")
def guest_image():
    """The test guest (tests/guest.py), built once; skipped only if its kernel can't be fetched."""
    import guest
    try:
        return guest.build_guest()
    except guest.GuestUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ceph_cluster(tmp_path_factory):
    """A one-node Ceph cluster (tests/cephcluster.py) for the test module; skipped
    only where Ceph is not installed.  Every daemon is killed by pid afterwards."""
    import cephcluster
    reason = cephcluster.available()
    if reason:
        pytest.skip(reason)
    cluster = cephcluster.CephCluster(tmp_path_factory.mktemp("ceph"))
    cluster.start()
    yield cluster
    cluster.stop()


def small_tmpfs(path, size):
    """Mount a tmpfs of size (e.g. "2M") at path for a test, unmount after (a
    generator for a fixture); skips the test without the right to mount."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs",
                       str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", "-l", str(path)])


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs for an overlay, so writes run out of space."""
    yield from small_tmpfs(tmp_path / "small", "2M")


@pytest.fixture
def connect():
    """Open libnbd handles to URIs; all closed after the test."""
    import nbd
    handles = []

    def _connect(uri, meta=True):
        h = nbd.NBD()
        if meta:
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield _connect
    for h in handles:
        try:
            h.shutdown()
        except Exception:
            pass
    handles.clear()              # libnbd closes a handle when it is collected


def make_image(path, size, chunks=(), seed=0):
    """A sparse raw image of size bytes with random data in the given (offset, length) chunks."""
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in chunks:
            f.seek(off)
            f.write(rnd.randbytes(length))
    return str(path)


def sha256_file(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
