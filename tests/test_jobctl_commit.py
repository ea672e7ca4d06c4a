"""`jobctl commit` against the real plugin: start, wait, JSON output, refusals."""

import json
import pathlib
import subprocess
import sys

import pytest

from commit_rig import CommitRig

TIMEOUT = 30


def jobctl_path():
    """The console script installed in the venv running the tests."""
    path = pathlib.Path(sys.executable).parent / "jobctl"
    if not path.exists():
        pytest.fail("jobctl is not installed: run .venv/bin/python -m pip install -e .")
    return str(path)


@pytest.fixture
def rig(servers, tmp_path):
    r = CommitRig(servers, tmp_path)
    r.fill_overlay()
    yield r
    r.qmp.close()


def jobctl(sock, *args):
    argv = [jobctl_path(), "--socket", str(sock), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)


def test_commit_wait_then_complete_wait(rig):
    r = jobctl(rig.ctl, "commit", "disk0", "--speed", "64M", "--on-error", "stop", "--wait")
    assert (r.returncode, r.stdout.splitlines()[-1]) == (0, "job 'disk0' is ready"), r.stderr
    job = rig.qmp.job("disk0")
    assert job["type"] == "commit" and job["speed"] == 64 << 20
    assert job["x-policies"] == {"on-error": "stop"}
    expected = rig.disk_bytes()
    r = jobctl(rig.ctl, "complete", "disk0", "--wait")
    assert (r.returncode, r.stdout.splitlines()[-1]) == (0, "job 'disk0' completed"), r.stderr
    assert rig.base_bytes() == expected
    assert rig.allocation()["absent-clusters"] == rig.allocation()["clusters"]


def test_commit_json_prints_the_id(rig):
    r = jobctl(rig.ctl, "commit", "disk0", "--job-id", "c", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"id": "c"}
    rig.qmp.wait_event("BLOCK_JOB_READY", device="c")
    assert rig.qmp.job("c")["type"] == "commit"


def test_commit_json_wait_ready(rig):
    r = jobctl(rig.ctl, "commit", "disk0", "--json", "--wait")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"id": "disk0", "result": "ready"}


def test_commit_refused_prints_qemus_error(servers, tmp_path):
    disk = servers.overlay(tmp_path / "ov", size="4M", control=str(tmp_path / "ctl.sock"))
    r = jobctl(tmp_path / "ctl.sock", "commit", "disk0")
    assert r.returncode == 1
    assert r.stderr.strip() == "jobctl: error: cannot commit an image into itself"
    disk.stop()
