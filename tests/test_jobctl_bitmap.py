"""`jobctl bitmap` against the real plugin: each action, the table, and `show`, whose
--json output must be byte for byte what nbdinfo --map --json prints for the same
bitmap served by qemu-nbd from a qcow2 (the qemu:dirty-bitmap context)."""

import json
import subprocess
import time

import nbd
import pytest

from bitmap_rig import MiB
from jobctl import bitmap_cmd
from helpers import Control
from test_jobctl_real import jobctl_path

SIZE = 16 * MiB
WRITES = [(MiB, 65536), (3 * MiB + 4096, 2 * MiB), (SIZE - 4096, 4096)]


@pytest.fixture
def disk(servers, tmp_path):
    sock = str(tmp_path / "ctl.sock")
    srv = servers.overlay(tmp_path / "ov", size=SIZE, control=sock)

    def run(*args):
        return subprocess.run([jobctl_path(), "--socket", sock, "bitmap", *args],
                              capture_output=True, text=True, timeout=30)
    return srv, run, sock


def _write(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    for offset, length in WRITES:
        h.pwrite(b"d" * length, offset)
    h.shutdown()


def test_add_list_and_the_other_actions(disk):
    srv, run, sock = disk
    assert run("add", "b1", "--persistent").returncode == 0
    assert run("add", "b2", "--granularity", "1M", "--disabled").returncode == 0
    _write(srv.uri)
    listed = run("list")
    assert listed.returncode == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DIRTY", "GRANULARITY", "RECORDING", "PERSISTENT",
                                "BUSY"]
    assert lines[1].split() == ["b2", "0", "B", "1.0", "MiB", "no", "no", "no"]
    assert lines[2].split() == ["b1", "2.2", "MiB", "64.0", "KiB", "yes", "yes", "no"]
    assert len(lines) == 3
    as_json = json.loads(run("list", "--json").stdout)
    control = Control(sock)
    assert as_json == {"bitmaps": control("query-block")[0]["dirty-bitmaps"]}
    assert run("merge", "b2", "b1").returncode == 0
    assert [b["count"] for b in json.loads(run("list", "--json").stdout)["bitmaps"]] == [
        5 * MiB, 35 * 65536]
    assert run("enable", "b2").returncode == 0
    assert run("clear", "b1").returncode == 0
    assert run("disable", "b1").returncode == 0
    assert run("remove", "b2").returncode == 0
    assert control("query-block")[0]["dirty-bitmaps"] == [
        {"name": "b1", "recording": False, "persistent": True, "busy": False,
         "granularity": 65536, "count": 0}]
    control.close()


def test_errors_are_one_line_and_exit_1(disk):
    srv, run, sock = disk
    r = run("clear", "nope")
    assert r.returncode == 1
    assert r.stderr == "jobctl: error: Dirty bitmap 'nope' not found\n"
    assert run("add", "x").returncode == 0
    r = run("add", "x")
    assert (r.returncode, r.stderr) == (1, "jobctl: error: Bitmap already exists: x\n")
    r = run("add", "y", "--granularity", "1000")
    assert r.stderr == "jobctl: error: Granularity must be power of 2 and at least 512\n"
    assert run("show", "x", "--device", "vdz").stderr == (
        "jobctl: error: Node 'vdz' not found\n")
    assert run("frobnicate").returncode == 2


def _nbdinfo_map(tmp_path, granularity):
    """nbdinfo --map --json of a qcow2 bitmap with WRITES, served by qemu-nbd."""
    image = tmp_path / "ref.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(granularity), str(image), "bm"],
                   check=True)
    script = []
    for offset, length in WRITES:
        script += ["-c", "write %d %d" % (offset, length)]
    subprocess.run(["qemu-io", "-f", "qcow2", *script, str(image)], check=True,
                   capture_output=True)
    sock = tmp_path / "ref.sock"
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-B", "bm", "-f", "qcow2", "-k", str(sock),
                             str(image)])
    try:
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:bm", "--json",
                                "nbd+unix:///?socket=%s" % sock], capture_output=True,
                               text=True)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.returncode == 0, r.stderr
        return r.stdout
    finally:
        qemu.kill()
        qemu.wait()


@pytest.mark.parametrize("granularity", [65536, MiB])
def test_show_json_is_what_nbdinfo_prints(disk, tmp_path, granularity):
    srv, run, sock = disk
    assert run("add", "bm", "--granularity", str(granularity)).returncode == 0
    _write(srv.uri)
    ours = run("show", "bm", "--json")
    assert ours.returncode == 0
    assert ours.stdout == _nbdinfo_map(tmp_path, granularity)


def test_show_prints_a_window_as_nbdinfo_map(disk):
    srv, run, sock = disk
    run("add", "bm")
    _write(srv.uri)
    shown = run("show", "bm", "--offset", "1M", "--length", "3M")
    assert shown.stdout.splitlines() == [
        "   1048576       65536    1  dirty",
        "   1114112     2031616    0  clean",
        "   3145728     1048576    1  dirty",
    ]


def test_map_entries_cover_the_range_asked():
    entries = bitmap_cmd.map_entries([(10, 5), (20, 5)], 0, 30)
    assert entries == [(0, 10, 0, "clean"), (10, 5, 1, "dirty"), (15, 5, 0, "clean"),
                       (20, 5, 1, "dirty"), (25, 5, 0, "clean")]
    assert bitmap_cmd.map_entries([], 0, 8) == [(0, 8, 0, "clean")]
    assert json.loads(bitmap_cmd.map_json(entries))[1] == {
        "offset": 10, "length": 5, "type": 1, "description": "dirty"}
