"""NBD servers for benchmarks: started in the foreground on Unix sockets, stopped by pid.

Every server the benchmark starts is registered in a Servers set, which stops
whatever is still running when the run ends, fails or is interrupted.  Servers
run in their own session (Ctrl-C reaches only the benchmark, which then stops
them in order) and get SIGTERM from the kernel if the benchmark dies without
cleaning up (PR_SET_PDEATHSIG), so no server outlives a run.
"""

import ctypes
import os
import signal
import socket
import subprocess
import time

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ServerError(Exception):
    """A server did not start or did not answer; the message includes its log tail."""


def nbd_uri(sock):
    return "nbd+unix:///?socket=%s" % sock


def qsd_monitor(control):
    """qemu-storage-daemon options: its QMP monitor on the Unix socket control."""
    return ["--chardev", "socket,id=mon,path=%s,server=on,wait=off" % control,
            "--monitor", "chardev=mon"]


def qsd_export(sock, node, name=None):
    """qemu-storage-daemon options: an NBD server on the Unix socket sock that
    exports node, writable, under its own name (or name)."""
    return ["--nbd-server", "addr.type=unix,addr.path=" + sock,
            "--export", "type=nbd,id=exp,node-name=%s,name=%s,writable=on"
            % (node, node if name is None else name)]


def free_port(addr="127.0.0.1"):
    """A TCP port nothing listens on now (for a server started on addr)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_for_port(port, server, addr="127.0.0.1", timeout=30.0):
    """Wait until server (started with ready=False) accepts on addr:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise ServerError("%s did not listen on port %d%s"
                                  % (server.name, port, server.log_tail()))
            time.sleep(0.02)


class Server:
    """One running server process: its pid, socket and log file."""

    def __init__(self, name, argv, sock, log_path, env=None):
        self.name = name
        self.argv = argv
        self.sock = sock
        self.log_path = log_path
        self.started_at = time.perf_counter()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def uri(self):
        return nbd_uri(self.sock)

    def wait_ready(self, timeout=60.0):
        """Wait until an NBD client can connect (nbdinfo --size succeeds).

        Returns the seconds from just before exec to that moment: the start-up time.
        """
        deadline = self.started_at + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError("%s exited with status %s before accepting connections%s"
                                  % (self.name, self.proc.returncode, self.log_tail()))
            if os.path.exists(self.sock):
                probe = subprocess.run(["nbdinfo", "--size", self.uri],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if probe.returncode == 0:
                    return time.perf_counter() - self.started_at
            if time.perf_counter() > deadline:
                raise ServerError("%s did not accept connections within %.0fs%s"
                                  % (self.name, timeout, self.log_tail()))
            time.sleep(0.001)

    def peak_rss(self):
        """VmHWM of the server process in bytes (None if it is gone)."""
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def stop(self, timeout=30.0):
        """SIGTERM by pid, then SIGKILL if it does not exit; returns the exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            return ""
        return ("\n--- %s (%s) ---\n" % (self.log_path, self.name) + "".join(tail)) if tail else ""


class Servers:
    """All servers of one benchmark run, in one temporary folder."""

    def __init__(self, folder):
        self.folder = folder
        self._running = []
        self._count = 0

    def _paths(self, name):
        self._count += 1
        stem = os.path.join(self.folder, "srv%d" % self._count)
        return stem + ".sock", stem + ".log"

    def start(self, name, argv_for_socket, env=None, ready=True):
        """Start argv_for_socket(sock) under name; wait until it serves unless ready=False."""
        sock, log = self._paths(name)
        server = Server(name, argv_for_socket(sock), sock, log, env=env)
        self._running.append(server)
        if ready:
            server.wait_ready()
        return server

    def nbdkit(self, name, *args, env=None, ready=True):
        """nbdkit in the foreground: `nbdkit -f -U SOCK ARGS...`."""
        return self.start(name, lambda sock: ["nbdkit", "-f", "-U", sock, *args],
                          env=env, ready=ready)

    def qemu_nbd(self, name, image, fmt, shared=None):
        """qemu-nbd as in the issue (`qemu-nbd -k SOCK -f FMT IMAGE`) plus -t.

        -t (persistent) keeps it serving after a client disconnects, which the
        readiness probe and repeated runs need; cache/aio stay at their
        defaults (writeback, threads).  shared: -e N, how many clients it serves
        at once; its default is 1, and a second connection then waits until
        the first one closes.
        """
        extra = ["-e", str(shared)] if shared else []
        return self.start(name, lambda sock: ["qemu-nbd", "-t", *extra, "-k", sock,
                                              "-f", fmt, image])

    def stop(self, server):
        """Read the server's peak RSS, stop it; returns the peak RSS in bytes."""
        rss = server.peak_rss()
        status = server.stop()
        self._running.remove(server)
        if status not in (0, -signal.SIGTERM):
            raise ServerError("%s exited with status %s%s" % (server.name, status, server.log_tail()))
        return rss

    def stop_all(self):
        """Stop everything still running (end of run, error, Ctrl-C); never raises."""
        while self._running:
            server = self._running.pop()
            try:
                server.stop(timeout=10.0)
            except Exception:  # cleanup must go on to the next server
                pass
