"""The soak's processes: the served disk (restarted on its state directory), its base
behind nbdkit, copy targets, the QMP session for commands and the one for events.

Every process is started with the test suite's helpers (tests/conftest.py's Server and
Servers, tests/netrig.py's TLS servers) and killed by pid at the end.
"""

import os
import pathlib
import signal
import subprocess
import threading
import time

from conftest import LAUNCHER, Server, Servers, make_image
from faults import FaultSwitch, error_args
from jobctl.qmp_client import ConnectionProblem, QMPClient, QMPError, Timeout
from netrig import Netns, nbdkit_tcp, psk_file, restart_tcp

MiB = 1 << 20
QMP_TIMEOUT = 30.0          # a reply later than this is a failure by itself
START_TIMEOUT = 30.0
RECONNECT_DELAY = 3         # plugin key: the base (and targets) may vanish this long unseen
TARGET_ERROR_OPS = ("pwrite", "zero", "trim")

__all__ = ["Rig", "Target", "QMPError"]


class Events(threading.Thread):
    """Collects every QMP event (with when it arrived); reconnects after a restart."""

    def __init__(self, ctl):
        super().__init__(name="events", daemon=True)
        self.ctl = ctl
        self.log = []                     # [(monotonic time, event)]
        self.connections = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            client = QMPClient(str(self.ctl), timeout=5)
            try:
                client.connect()
            except (ConnectionProblem, Timeout, OSError):
                time.sleep(0.02)
                continue
            self.connections += 1
            try:
                while not self._halt.is_set():
                    event = client.next_event(0.2)
                    if event is not None:
                        with self._lock:
                            self.log.append((time.monotonic(), event))
            except (ConnectionProblem, Timeout, OSError):
                pass
            finally:
                client.close()

    def since(self, index):
        with self._lock:
            return self.log[index:]

    def wait_connected(self, after, timeout=10):
        deadline = time.monotonic() + timeout
        while self.connections <= after and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.connections > after

    def stop(self):
        self._halt.set()
        self.join(10)


class Rig:
    def __init__(self, workdir, size, seed):
        self.workdir = pathlib.Path(workdir)
        self.size = size
        self.servers = Servers(self.workdir)
        half = size // 2
        self.base_path = make_image(self.workdir / "base.img", size,
                                    [(0, half - 3 * MiB), (half, half // 2)], seed=seed)
        # Writable: block-commit writes the overlay back into it (docs/commit.md).
        self.base_server = self.servers.nbdkit("file", self.base_path)
        self.fs = self._mount_tmpfs(self.workdir / "fs", 6 * size)
        self.state = (self.fs or self.workdir) / "ov"
        self._new_state = True
        self.ctl = self.workdir / "ctl.sock"
        self.sock = self.workdir / "disk.sock"
        self.disk_uri = "nbd+unix:///?socket=%s" % self.sock
        self.generation = 0               # bumped before the disk server is signalled
        self.up = False                   # clients may connect (not while it goes down)
        # Held by a client from its look at `up` to its connection made, and by a kill:
        # no connection is being made to a server that goes down (its SIGTERM would
        # wait for that client, whose handshake may never finish).
        self.connect_lock = threading.Lock()
        self.disk = None
        self.logs = []
        self._log_pos = {}
        self.qmp_times = []               # (command, seconds, start)
        self._client = None
        self._psk = None
        self._netns = None                # made on first use; False: cannot be made here
        self.events = Events(self.ctl)

    # -- the disk server ------------------------------------------------------

    def start(self):
        self._start_disk()
        self.events.start()
        self.events.wait_connected(0)

    def _start_disk(self):
        log = self.workdir / ("disk-%d.log" % len(self.logs))
        argv = [str(LAUNCHER), "-f", "-U", str(self.sock), "overlay=%s" % self.state,
                "control=%s" % self.ctl, "log=stderr", "reconnect-delay=%d" % RECONNECT_DELAY]
        if self._new_state:               # later the state directory knows (or dropped) it
            argv.append("base=%s" % self.base_server.uri)
            self._new_state = False
        server = Server(argv, self.sock, log, control=str(self.ctl))
        self.servers.started.append(server)
        self.logs.append(log)
        self.disk = server
        server.wait_ready(START_TIMEOUT)
        self.up = True

    def _going_down(self):
        with self.connect_lock:
            self.up = False
            self.generation += 1

    def kill9(self):
        self._going_down()
        self.close_qmp()
        self.disk.kill9()

    def sigterm(self, timeout):
        """SIGTERM; the seconds nbdkit took to exit, or None if it did not within timeout."""
        self._going_down()
        self.close_qmp()
        t0 = time.monotonic()
        self.disk.proc.send_signal(signal.SIGTERM)
        try:
            self.disk.proc.wait(timeout)
        except Exception:
            return None
        took = time.monotonic() - t0
        self.disk.kill9()                 # reaps and removes the socket
        return took

    def dump_stuck(self, why):
        """What the disk's nbdkit is doing (gdb backtraces of every thread, its
        descriptors), into a file next to the logs; its path (None without gdb)."""
        pid = self.disk.pid
        path = self.workdir / ("stuck-%d.txt" % pid)
        try:
            bt = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                                capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
        fds = "\n".join("%s -> %s" % (fd, os.readlink("/proc/%d/fd/%s" % (pid, fd)))
                        for fd in os.listdir("/proc/%d/fd" % pid))
        path.write_text("%s\n\n%s\n\n%s\n" % (why, bt, fds))
        self.logs.append(path)
        return path

    def restart(self):
        before = self.events.connections
        self._start_disk()
        self.events.wait_connected(before)

    def fresh(self, name):
        """Kill the disk and serve a new one: a new state directory over the base."""
        self.kill9()
        self.state = (self.fs or self.workdir) / name
        self._new_state = True
        self.restart()

    @property
    def alive(self):
        return self.disk.proc.poll() is None

    def process(self):
        """(RSS bytes, open descriptors) of the disk's nbdkit, from /proc."""
        pid = self.disk.pid
        rss = 0
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir("/proc/%d/fd" % pid))

    def new_log(self):
        """What the disk's logs gained since the last call."""
        out = []
        for path in self.logs:
            try:
                with open(path, "rb") as f:
                    f.seek(self._log_pos.get(path, 0))
                    out.append(f.read().decode(errors="replace"))
                    self._log_pos[path] = f.tell()
            except FileNotFoundError:
                pass
        return "".join(out)

    # -- QMP ------------------------------------------------------------------

    def qmp(self, command, args=None):
        """Run one command; its value, or QMPError.  Every reply time is recorded."""
        if self._client is None:
            client = QMPClient(str(self.ctl), timeout=QMP_TIMEOUT)
            client.connect()
            self._client = client
        start = time.monotonic()
        try:
            return self._client.execute(command, args or {})
        except (ConnectionProblem, Timeout):
            self.close_qmp()
            raise
        finally:
            self.qmp_times.append((command, time.monotonic() - start, start))

    def close_qmp(self):
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def jobs(self):
        return {j["device"]: j for j in self.qmp("query-block-jobs")}

    def block(self):
        return self.qmp("query-block")[0]

    def psk(self):
        if self._psk is None:
            self._psk = psk_file(self.workdir)
        return self._psk

    @staticmethod
    def _mount_tmpfs(path, size):
        """A tmpfs of `size` bytes for the state directories (the overlay_full fault
        fills it), or None where one cannot be mounted (not root)."""
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "soak", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return path if done.returncode == 0 else None

    def netns(self):
        """A network namespace across a veth link (tests/netrig.py), or None where
        one cannot be made (not root, no iproute2)."""
        if self._netns is None:
            try:
                self._netns = Netns()
            except Exception:
                self._netns = False
        return self._netns or None

    def close(self):
        self.close_qmp()
        self.events.stop()
        self.servers.cleanup()
        if self._netns:
            self._netns.delete()
        if self.fs is not None:
            subprocess.run(["umount", "-l", str(self.fs)], stderr=subprocess.DEVNULL)


class Target:
    """A copy target: an image file, maybe served by nbdkit (a Unix socket, TLS over
    TCP, or TCP in a network namespace across a link that can go down) behind the error
    filter, which fails writes while its FaultSwitch is on."""

    def __init__(self, rig, name, kind, errno="EIO", fill=None):
        self.rig, self.name, self.kind = rig, name, kind
        self.path = rig.workdir / (name + ".img")
        with open(self.path, "wb") as f:
            f.truncate(rig.size)
            if fill is not None:
                f.write(fill)
        self.switch = FaultSwitch(rig.workdir / (name + ".fault"))
        self.errno = errno
        self.stopped = False
        self.running_since = time.monotonic()
        self.protected = False            # the disk is served from it (a pivot)
        self.server = None
        errors = error_args(self.switch, error=errno, ops=TARGET_ERROR_OPS)
        if kind == "far" and rig.netns() is None:
            self.kind = kind = "nbd"
        if kind == "file":
            self.uri = str(self.path)
        elif kind == "nbd":
            self.server = rig.servers.nbdkit("file", str(self.path), *errors, filters=["error"])
            self.uri = self.server.uri
        elif kind == "tls":
            self.server = nbdkit_tcp(rig.servers, name, ["--filter=error", "file",
                                                         str(self.path), *errors],
                                     psk=rig.psk())
            self.uri = self.server.uri
        else:
            ns = rig.netns()
            self.server = nbdkit_tcp(rig.servers, name, ["--filter=error", "file",
                                                         str(self.path), *errors],
                                     addr=ns.there, prefix=ns.exec_prefix)
            self.uri = self.server.uri

    def __repr__(self):
        return "%s(%s)" % (self.name, self.kind)

    @property
    def served(self):
        return self.server is not None

    def kill9(self):
        self.cont()
        self.server.kill9()

    def restart(self):
        if self.kind in ("tls", "far"):
            self.server = restart_tcp(self.rig.servers, self.server)
        else:
            self.server = self.rig.servers.restart(self.server)

    def stop(self):
        os.kill(self.server.pid, signal.SIGSTOP)
        self.stopped = True

    def cont(self):
        if self.stopped:
            os.kill(self.server.pid, signal.SIGCONT)
            self.stopped = False
            self.running_since = time.monotonic()

    def read(self):
        return self.path.read_bytes()

    def close(self):
        """The job is over: its server goes (by pid), the image stays for the report."""
        self.switch.off()
        if self.server is not None and not self.protected:
            self.kill9()
