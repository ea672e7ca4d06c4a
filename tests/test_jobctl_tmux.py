"""jobctl's output in a real terminal of 80 and 120 columns (tmux), against the test control server.

jobctl runs inside `tmux new-session -d -x WIDTH -y 24`, so its stdout is a
terminal of that width; the test reads the screen back with
`capture-pane -J` (wrapped lines joined, so a line that wrapped shows as one
line longer than the width) and checks that every line fits and says the
right things. The pane tells the test it is done through `tmux wait-for`.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess

import pytest

from helpers import jobctl_path
from test_jobctl_e2e import ControlProcess, ok, poll_until, start_job, status_is

TIMEOUT = 30
LONG_ID = "nightly-backup-of-the-database-disk-to-the-second-site"

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


class Terminal:
    """A private tmux server (its own socket in tmp) running one command in a pane."""

    def __init__(self, tmp_path, width, height=24):
        self.sock = str(tmp_path / "tmux.sock")
        self.width = width
        self.height = height
        self.pid = None

    def tmux(self, *args, timeout=TIMEOUT):
        return subprocess.run(["tmux", "-S", self.sock, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=timeout, check=True)

    def run(self, argv):
        """Run argv in a fresh pane; return (exit code, screen lines) once it has finished."""
        command = " ".join(shlex.quote(str(a)) for a in argv)
        tmux = f"tmux -S {shlex.quote(self.sock)}"
        script = (f"{command}; echo rc=$?; {tmux} wait-for -S done; {tmux} wait-for finish")
        self.tmux("new-session", "-d", "-x", str(self.width), "-y", str(self.height),
                  "-s", "t", script)
        self.pid = int(self.tmux("display-message", "-p", "#{pid}").stdout)
        self.tmux("wait-for", "done")
        screen = self.tmux("capture-pane", "-p", "-J", "-t", "t").stdout.rstrip("\n").splitlines()
        self.tmux("wait-for", "-S", "finish")       # the pane, its session and the server end
        while screen and not screen[-1].strip():
            screen.pop()
        assert screen[-1].startswith("rc="), screen
        return int(screen[-1][3:]), screen[:-1]

    def close(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture
def server(tmp_path):
    proc = ControlProcess(tmp_path)
    yield proc
    proc.stop()


@pytest.fixture
def terminal(tmp_path):
    made = []

    def make(width):
        term = Terminal(tmp_path, width)
        made.append(term)
        return term

    yield make
    for term in made:
        term.close()


def fits(lines, width):
    too_long = [line for line in lines if len(line.rstrip()) > width]
    assert not too_long, f"lines longer than {width}: {too_long}"


@pytest.mark.parametrize("width", [80, 120])
def test_status_table_fits_the_terminal(server, terminal, width):
    start_job(server, "disk0", steps=1000, delay=0.1)
    start_job(server, LONG_ID, steps=1000, delay=0.1, paused=True)
    start_job(server, "m1", fail_at=0.0, on_error="stop", delay=0.01, steps=100)
    poll_until(status_is(server, "paused", "m1"))
    poll_until(status_is(server, "paused", LONG_ID))
    code, screen = terminal(width).run([jobctl_path(), "--socket", server.sock, "status"])
    assert code == 0
    fits(screen, width)
    assert screen[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "IO-STATUS", "ERROR"]
    rows = {line.split()[0]: line for line in screen[1:] if line and not line[0].isspace()}
    assert rows["disk0"].split()[1:3] == ["stream", "running"]
    assert "[" in rows["disk0"] and "%" in rows["disk0"]
    assert rows["m1"].split()[1:3] == ["stream", "paused"]
    assert " failed " in rows["m1"]
    # The long id is whole, on one line of its own, its row under it.
    assert LONG_ID in rows
    after = screen[screen.index(rows[LONG_ID]) + 1]
    assert rows[LONG_ID].strip() == LONG_ID and after.split()[:2] == ["stream", "paused"]


@pytest.mark.parametrize("width", [80, 120])
def test_wait_progress_line_fits_the_terminal(server, terminal, width):
    # 1000 GiB: amounts and rates long enough that the full line needs more than 80 columns.
    start_job(server, "j", total=1000 << 30, steps=40, delay=0.05, auto_dismiss=False)
    code, screen = terminal(width).run([jobctl_path(), "--socket", server.sock, "wait", "j"])
    assert code == 0
    fits(screen, width)
    assert screen[-1] == "job 'j' completed"
    progress = screen[-2]
    assert progress.startswith("[") and "%" in progress
    assert "GiB/1000.0 GiB" in progress and "GiB/s" in progress and "ETA" in progress
    assert progress.split()[-1] in ("running", "waiting", "pending", "concluded")
    bar = progress[:progress.index("]") + 1]
    if width == 120:
        assert len(bar) == 22           # room for the full bar
    else:
        assert 5 + 2 <= len(bar) < 22   # the bar shrank, everything else stayed


@pytest.mark.parametrize("width", [80, 120])
def test_mirror_wait_progress_line_fits_the_terminal(server, terminal, width):
    code, screen = terminal(width).run([jobctl_path(), "--socket", server.sock, "mirror", "disk0",
                                        "nbd://localhost/x", "--job-id", LONG_ID, "--wait"])
    assert code == 0
    fits(screen, width)
    assert screen[-1] == f"job '{LONG_ID}' is ready"
    assert screen[-2].startswith("[") and "%" in screen[-2]
    assert json.loads(ok(server, "status", "--json"))["jobs"][0]["id"] == LONG_ID
