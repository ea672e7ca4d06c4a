"""The systemd units (contrib/systemd) and scripts/install-service, without systemd as PID 1.

CI runs in a container where systemd is not the service manager, so these tests
use only systemd's standalone tools: `systemd-analyze verify` and `security
--offline` read the installed unit files; `systemd-socket-activate` holds the
NBD socket and starts the unit's own ExecStart line (specifiers and variables
expanded as systemd would) on the first connection, as the socket unit does.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import nbd
import pytest

from conftest import REPO, make_image
from plugin.core.host import unix_listeners
from helpers import Control

MiB = 1 << 20
UNITS = ("overlay-nbd@.service", "overlay-nbd@.socket", "overlay-nbd-metrics@.service")

pytestmark = pytest.mark.skipif(
    not (shutil.which("systemd-analyze") and shutil.which("systemd-socket-activate")),
    reason="systemd's tools are not installed (scripts/setup installs them)")


def install(root, *extra):
    """scripts/install-service into root (no user, no systemctl, no download)."""
    argv = [str(REPO / "scripts" / "install-service"), "--prefix", str(root / "opt"),
            "--unit-dir", str(root / "units"), "--config-dir", str(root / "etc"),
            "--bin-dir", str(root / "bin"), "--no-user", "--no-systemctl",
            "--pip-option", "--no-deps", "--pip-option", "--no-index", *extra]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install(tmp_path_factory.mktemp("install"))


def verify(units_dir, *names):
    out = subprocess.run(["systemd-analyze", "verify", *("./" + n for n in names)],
                         cwd=units_dir, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def unit_settings(text, section):
    """[(key, value)] of one section of a unit file, in order."""
    settings, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


def exec_start(units_dir, instance, state_dir, conf=None):
    """The argv systemd would run for overlay-nbd@INSTANCE.service: Environment= lines
    (the drop-ins' after the unit's), then the EnvironmentFile, then ExecStart with
    `$VAR` split into words and `${VAR}` kept as one; %S is state_dir."""
    texts = [(units_dir / "overlay-nbd@.service").read_text()]
    dropins = units_dir / "overlay-nbd@.service.d"
    if dropins.is_dir():
        texts += [p.read_text() for p in sorted(dropins.glob("*.conf"))]

    def specifiers(value):
        return value.replace("%i", instance).replace("%S", str(state_dir))

    env, command = {}, None
    for text in texts:
        for key, value in unit_settings(text, "Service"):
            if key == "Environment":
                name, _, val = specifiers(value).partition("=")
                env[name] = val
            elif key == "ExecStart":
                command = specifiers(value)
    if conf is not None:
        for line in conf.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                name, _, val = line.partition("=")
                env[name.strip()] = " ".join(shlex.split(val))
    argv = []
    for word in command.split():
        if re.fullmatch(r"\$\w+", word):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def test_units_pass_systemd_analyze_verify(installed):
    code, output = verify(installed / "units", "overlay-nbd@disk1.service",
                          "overlay-nbd@disk1.socket", "overlay-nbd-metrics@disk1.service")
    assert (code, output) == (0, "")


def test_verify_would_catch_a_bad_unit(installed, tmp_path):
    """The check above is worth something: a misspelt key or a missing program is reported."""
    bad = tmp_path / "units"
    shutil.copytree(installed / "units", bad)
    service = bad / "overlay-nbd@.service"
    service.write_text(service.read_text().replace("UMask=", "UMaks="))
    code, output = verify(bad, "overlay-nbd@disk1.service")
    assert "Unknown key 'UMaks'" in output
    service.write_text(service.read_text().replace(str(installed / "opt"), "/nonexistent"))
    code, output = verify(bad, "overlay-nbd@disk1.service")
    assert code != 0 and "is not executable" in output


def test_hardened_units_rate_ok_in_systemd_analyze_security(installed):
    for unit in ("overlay-nbd@disk1.service", "overlay-nbd-metrics@disk1.service"):
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", "./" + unit],
                             cwd=installed / "units", capture_output=True, text=True, timeout=120)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", out.stdout)
        assert level is not None, out.stdout + out.stderr
        assert level.group(2) in ("SAFE", "OK"), level.group(0)


def test_installed_units_point_at_the_prefix_and_the_state_root(installed):
    argv = exec_start(installed / "units", "disk1", "/var/lib")
    assert argv[0] == str(installed / "opt" / "scripts" / "nbdkit-overlay")
    assert "overlay=/var/lib/overlay-nbd/disk1" in argv and "log=stderr" in argv
    assert os.path.realpath(installed / "opt" / "plugin" / "overlaydisk.py").endswith(
        "site-packages/overlay_nbd/plugin/overlaydisk.py")
    assert os.access(installed / "bin" / "jobctl", os.X_OK)
    assert (installed / "etc" / "example.conf").read_text().count("OVERLAY_NBD_") == 3


def test_a_state_root_elsewhere_gets_a_drop_in_that_verify_accepts(tmp_path):
    root = install(tmp_path, "--state-root", str(tmp_path / "srv"))
    dropin = (root / "units" / "overlay-nbd@.service.d" / "state-root.conf").read_text()
    assert "StateDirectory=\n" in dropin and "ReadWritePaths=%s\n" % (tmp_path / "srv") in dropin
    code, output = verify(root / "units", "overlay-nbd@disk1.service",
                          "overlay-nbd-metrics@disk1.service")
    assert (code, output) == (0, "")
    assert "overlay=%s/disk1" % (tmp_path / "srv") in exec_start(root / "units", "disk1", "/x")


class Activated:
    """systemd-socket-activate holding sock and starting the unit's ExecStart on the
    first connection (it execs the command: its pid becomes nbdkit's)."""

    def __init__(self, sock, argv, log_path):
        self.sock = sock
        self.log_path = log_path
        if os.path.exists(sock):
            os.unlink(sock)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), *argv],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        # Listening, not only bound: a probe connection would start nbdkit.
        deadline = time.monotonic() + 30
        while not unix_listeners(str(sock)):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "no socket: " + self.log()
            time.sleep(0.02)

    def log(self):
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def command(self):
        with open("/proc/%d/cmdline" % self.proc.pid, "rb") as f:
            return f.read().split(b"\0")

    def stop(self):
        """SIGTERM, as systemd's stop; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._log.close()
        return code

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@pytest.fixture
def activate(installed, tmp_path):
    """Start the installed unit's command for instance disk1 under socket activation."""
    started = []
    state = tmp_path / "state"
    (state / "overlay-nbd").mkdir(parents=True)      # StateDirectory='s parent

    def start(conf=None):
        argv = exec_start(installed / "units", "disk1", state, conf)
        a = Activated(tmp_path / "disk1.sock", argv, tmp_path / ("nbdkit%d.log" % len(started)))
        started.append(a)
        return a

    start.state_dir = state / "overlay-nbd" / "disk1"
    yield start
    for a in started:
        a.kill()


def wait_for_socket(path, proc, timeout=30):
    """Wait until something listens on the Unix socket path (the control server)."""
    deadline = time.monotonic() + timeout
    while not unix_listeners(str(path)):
        assert proc.poll() is None and time.monotonic() < deadline, "no %s" % path
        time.sleep(0.02)


def test_socket_activation_serves_the_disk_to_a_client_that_came_first(activate, tmp_path):
    server = activate(conf='OVERLAY_NBD_KEYS="size=16M device=vda"\n')
    assert not activate.state_dir.exists()          # nbdkit has not run yet
    assert server.command()[0] == b"systemd-socket-activate"
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///?socket=%s" % server.sock)   # starts nbdkit, then served
    assert h.get_size() == 16 * MiB
    h.pwrite(b"activated" * 512, 4 * MiB)
    h.flush()
    assert h.pread(9, 4 * MiB) == b"activated"
    assert server.command()[0] == b"nbdkit"        # the same process, exec'd
    control = activate.state_dir / "control.sock"
    wait_for_socket(control, server.proc)
    qmp = Control(control)
    assert qmp.execute("query-block")[0]["device"] == "vda"
    assert qmp.execute("x-query-process")["pid"] == server.proc.pid
    qmp.close()
    h.shutdown()
    assert server.stop() == 0
    log = server.log()
    assert "INFO plugin.service: serving device=vda size=16777216" in log
    assert "python: pwrite" not in log              # log=stderr, not nbdkit -v


def test_sigterm_while_a_mirror_runs_saves_it_and_the_restart_brings_it_back(activate,
                                                                              tmp_path):
    base = make_image(tmp_path / "base.img", 32 * MiB, [(0, 32 * MiB)], seed=8)
    target = make_image(tmp_path / "target.img", 32 * MiB)
    server = activate(conf='OVERLAY_NBD_KEYS="base=%s"\n' % base)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///?socket=%s" % server.sock)
    control = activate.state_dir / "control.sock"
    wait_for_socket(control, server.proc)
    qmp = Control(control)
    qmp("drive-mirror", device="disk0", target=target, sync="full", job_id="m0",
        speed=4 * MiB, on_target_error="stop")
    qmp.wait_status("m0", "running")
    offset = qmp.job("m0")["offset"]
    qmp.close()
    h.shutdown()
    t0 = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - t0 < 10
    record = json.loads((activate.state_dir / "jobs" / "m0.json").read_text())
    assert record["shutdown"] is True and record["paused"] is False
    first = server.log()
    assert "Job suspended job=m0" in first
    assert re.search(r"Job status change job=m0 from=created to=running", first)

    again = activate(conf='OVERLAY_NBD_KEYS="base=%s"\n' % base)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///?socket=%s" % again.sock)
    wait_for_socket(control, again.proc)
    qmp = Control(control)
    job = qmp.job("m0")
    assert (job["type"], job["status"], job["speed"]) == ("mirror", "running", 4 * MiB)
    assert job["x-policies"]["on-target-error"] == "stop" and job["offset"] >= offset
    qmp("block-job-cancel", device="m0", force=True)
    qmp.wait_status("m0", "null")
    qmp.close()
    h.shutdown()
    assert again.stop() == 0
    assert re.search(r"Job recovered job=m0 type=mirror after=shutdown status=running",
                     again.log())
