"""drive-mirror refuses a target that is the disk itself, with no side effect.

The base (never written), any file of the state directory, the disk's own NBD
export (Unix socket or TCP port), and the storage a pivoted disk is served from.
"""

import os
import socket

import pytest

from conftest import PLUGIN, Server, make_image, sha256_file
from jobctl.qmp_client import QMPError
from helpers import Control

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def disk(servers, tmp_path):
    base = make_image(tmp_path / "base.img", SIZE, [(0, MiB)], seed=3)
    ctl = tmp_path / "ctl.sock"
    server = servers.overlay(tmp_path / "ov", base=base, control=str(ctl))
    qmp = Control(ctl)
    yield server, qmp, base, tmp_path / "ov"
    qmp.close()


def refused(qmp, target):
    with pytest.raises(QMPError) as e:
        qmp("drive-mirror", device="disk0", target=target, sync="full")
    assert qmp.execute("query-block-jobs") == []
    return str(e.value)


def test_the_base_file_is_refused_and_never_written(disk):
    _, qmp, base, _ = disk
    before = sha256_file(base)
    assert "it is the disk's base" in refused(qmp, base)
    assert sha256_file(base) == before


def test_a_symlink_to_the_base_is_refused_too(disk, tmp_path):
    _, qmp, base, _ = disk
    link = tmp_path / "innocent.img"
    link.symlink_to(base)
    assert "it is the disk's base" in refused(qmp, str(link))


@pytest.mark.parametrize("name", ["data.img", "clusters.map", "meta.json"])
def test_files_of_the_state_directory_are_refused(disk, name):
    _, qmp, _, state = disk
    before = sha256_file(state / name)
    assert "in the disk's state directory" in refused(qmp, str(state / name))
    assert sha256_file(state / name) == before


def test_a_hard_link_to_data_img_is_refused(disk, tmp_path):
    _, qmp, _, state = disk
    link = tmp_path / "copy.img"
    os.link(state / "data.img", link)
    assert "data.img in the disk's state directory" in refused(qmp, str(link))


def test_the_disks_own_unix_socket_is_refused(disk):
    server, qmp, _, _ = disk
    assert "own NBD export" in refused(qmp, server.uri)


def test_the_disks_own_tcp_port_is_refused(servers, tmp_path):
    base = make_image(tmp_path / "base.img", SIZE, [(0, MiB)], seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctl = tmp_path / "ctl.sock"
    argv = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "python", str(PLUGIN),
            "overlay=%s" % (tmp_path / "ov"), "base=%s" % base, "control=%s" % ctl]
    server = Server(argv, ctl, tmp_path / "tcp.log", control=str(ctl))
    servers.started.append(server)
    server.wait_ready()
    qmp = Control(ctl)
    try:
        for host in ("127.0.0.1", "localhost"):
            assert "own NBD export" in refused(qmp, "nbd://%s:%d/" % (host, port))
    finally:
        qmp.close()


def test_an_nbd_base_is_refused_as_a_target(servers, tmp_path):
    base_file = make_image(tmp_path / "b.img", SIZE, [(0, MiB)], seed=4)
    base = servers.nbdkit("file", base_file)
    ctl = tmp_path / "ctl.sock"
    servers.overlay(tmp_path / "ov", base=base.uri, control=str(ctl))
    qmp = Control(ctl)
    try:
        assert "it is the disk's base" in refused(qmp, base.uri)
    finally:
        qmp.close()


def test_another_target_is_accepted_and_after_the_pivot_it_is_the_disk(disk, tmp_path):
    _, qmp, _, _ = disk
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    qmp("drive-mirror", device="disk0", target=str(target), sync="full")
    qmp.wait_event("BLOCK_JOB_READY")
    qmp("block-job-complete", device="disk0")
    qmp.wait_status("disk0", "null")
    assert "the storage this disk is served from" in refused(qmp, str(target))
