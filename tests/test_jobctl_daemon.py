"""jobctl against our plugin in a daemonized nbdkit, whose working directory is /.

A daemonized nbdkit (no -f) runs in /, not in the caller's directory, so
every relative path jobctl sends would be opened under /. These tests run
jobctl from a temp folder with relative targets and check the mirror reaches
them; they also cover socket discovery, the NBD-socket mistake, stop/cont
and the hint on a refused soft cancel against the real plugin.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import PLUGIN, _accepts, make_image, nbd_uri
from helpers import jobctl_path, wait_for_pidfile

MiB = 1 << 20
SIZE = 8 * MiB
TIMEOUT = 30


class DaemonDisk:
    """Our plugin in a daemonized nbdkit (cwd /), found by its pid file; killed by that pid."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.overlay = tmp_path / "state"
        self.base = make_image(tmp_path / "base.img", SIZE, [(0, MiB), (5 * MiB, 2 * MiB)], seed=3)
        self.sock = str(tmp_path / "disk.sock")
        self.control = str(self.overlay / "control.sock")      # the plugin's default
        self.pidfile = tmp_path / "nbdkit.pid"
        self.pid = None
        argv = ["nbdkit", "-U", self.sock, "-P", str(self.pidfile), "python", str(PLUGIN),
                f"overlay={self.overlay}", f"base={self.base}"]
        # Without -f nbdkit forks into the background and its first process exits at once.
        started = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + TIMEOUT
        self.pid = wait_for_pidfile(self.pidfile, TIMEOUT)
        assert os.readlink(f"/proc/{self.pid}/cwd") == "/"
        while not _accepts(self.control):
            assert time.monotonic() < deadline, "the control socket did not open"
            time.sleep(0.02)

    def run(self, *args, cwd=None, env=None):
        """jobctl with --socket pointing at the control socket, run in cwd (default: tmp)."""
        return self.jobctl("--socket", self.control, *args, cwd=cwd, env=env)

    def jobctl(self, *args, cwd=None, env=None):
        return subprocess.run([jobctl_path(), *map(str, args)], capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=cwd or self.tmp, env=env)

    def ok(self, *args, **kwargs):
        result = self.run(*args, **kwargs)
        assert result.returncode == 0, (result.stdout, result.stderr)
        return result.stdout

    def stop(self):
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + TIMEOUT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon(tmp_path):
    disk = DaemonDisk(tmp_path)
    yield disk
    disk.stop()


def base_bytes(disk):
    with open(disk.base, "rb") as f:
        return f.read()


def mirror_point_in_time(disk, target, cwd=None):
    """mirror --wait (ready), then a soft cancel --wait: the target is a full copy."""
    result = disk.run("mirror", "disk0", target, "--wait", "--timeout", "20", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "job 'disk0' is ready"
    result = disk.run("cancel", "disk0", "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stderr


def test_relative_socket_in_an_nbd_uri_reaches_the_target(daemon, servers, tmp_path):
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    served = servers.nbdkit("file", str(target))
    assert os.path.dirname(served.sock) == str(tmp_path)
    mirror_point_in_time(daemon, f"nbd+unix:///?socket={os.path.basename(served.sock)}")
    assert target.read_bytes() == base_bytes(daemon)


def test_relative_file_target_is_the_callers_file(daemon, tmp_path):
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / "copy.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    mirror_point_in_time(daemon, "copy.img", cwd=tmp_path / "sub")
    assert target.read_bytes() == base_bytes(daemon)


def test_overlay_option_and_environment_find_the_control_socket(daemon, tmp_path):
    assert daemon.jobctl("--overlay", daemon.overlay, "status").stdout == "no jobs\n"
    assert daemon.jobctl("status", "--overlay", "state").stdout == "no jobs\n"     # relative
    env = dict(os.environ, OVERLAY_DIR=str(daemon.overlay))
    env.pop("JOBCTL_SOCKET", None)
    assert daemon.jobctl("status", env=env, cwd="/").stdout == "no jobs\n"


def test_server_not_running_says_where_jobctl_looked(daemon, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JOBCTL_SOCKET", "OVERLAY_DIR")}
    result = daemon.jobctl("status", env=env)
    assert result.returncode == 3
    assert result.stderr == (
        "jobctl: error: cannot connect to control.sock: server not running (no such socket); "
        f"jobctl looked for ./control.sock in {tmp_path} (the default): point jobctl at the "
        "server with --socket PATH, --overlay STATE_DIR, JOBCTL_SOCKET=PATH or "
        "OVERLAY_DIR=STATE_DIR\n")


def test_nbd_socket_is_named_instead_of_garbage(daemon):
    result = daemon.jobctl("--socket", daemon.sock, "status")
    assert result.returncode == 3
    assert result.stderr == (
        f"jobctl: error: cannot connect to {daemon.sock}: that is an NBD socket, not a control "
        "socket (the control socket is STATE_DIR/control.sock, or the plugin's control= path)\n")
    assert daemon.ok("status") == "no jobs\n"        # the server is none the worse


def test_stop_and_cont_hold_and_release_guest_io(daemon, connect):
    assert daemon.ok("stop") == ""
    assert json.loads(daemon.ok("qmp", "query-status")) == {"running": False, "status": "paused"}
    assert daemon.ok("cont") == ""
    assert json.loads(daemon.ok("qmp", "query-status")) == {"running": True, "status": "running"}
    h = connect(nbd_uri(daemon.sock))
    h.pwrite(b"after cont" * 10, 0)                 # I/O goes on
    assert bytes(h.pread(100, 0)) == b"after cont" * 10


def test_refused_soft_cancel_of_a_paused_job_hints_at_force(daemon, servers, tmp_path):
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    served = servers.nbdkit("file", str(target))
    daemon.ok("mirror", "disk0", served.uri, "--speed", "64K")
    daemon.ok("pause", "disk0")
    result = daemon.run("cancel", "disk0")
    assert result.returncode == 1
    assert result.stderr == (
        "jobctl: error: The block job for device 'disk0' is currently paused (to cancel a "
        "paused job use 'jobctl cancel --force disk0', or 'jobctl resume disk0' first)\n")
    result = daemon.run("cancel", "--force", "disk0", "--wait", "--timeout", "20")
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "job 'disk0' was cancelled")
