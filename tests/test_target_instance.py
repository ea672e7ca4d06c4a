"""What a mirror target's instance() names (plugin/backends/target.py): the thing that
holds the writes it answered, for the life of the machine.  A restored mirror skips
comparing what it had copied only when this is the same (MirrorJob._vouch_target), so
every case where it cannot be told must give None, never a wrong match."""

import os
import socket
import struct

import nbd

from helpers import wait_for_pidfile
from netrig import nbdkit_tcp
from plugin.backends.filetarget import FileTarget
from plugin.backends.nbdtarget import NbdTarget
from plugin.core.host import server_instance
from plugin.core import host

MiB = 1 << 20


def _nbd_instance(uri):
    t = NbdTarget(uri)
    try:
        assert t.wait_open(30)
        return t.instance()
    finally:
        t.close()


def test_a_file_is_the_same_instance_through_any_descriptor_and_another_file_is_not(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(MiB)
    first, again, other = FileTarget(str(a)), FileTarget(str(a)), FileTarget(str(b))
    try:
        got = first.instance()
        assert got is not None and got["kind"] == "file"
        assert got["boot"] == host.boot_id().hex()
        assert got == again.instance() and got != other.instance()
    finally:
        for t in (first, again, other):
            t.close()
    os.unlink(a)                     # a new file at the same path is another instance
    with open(a, "wb") as f:
        f.truncate(MiB)
    renewed = FileTarget(str(a))
    try:
        assert renewed.instance() != got
    finally:
        renewed.close()


def test_an_nbd_server_on_a_unix_socket_is_its_process_and_a_restart_is_another(servers):
    srv = servers.nbdkit("memory", "8M")
    got = _nbd_instance(srv.uri)
    assert got is not None and got["kind"] == "nbd-unix" and got["pid"] == srv.pid
    assert got["start"] == host.process_start(srv.pid)
    assert _nbd_instance(srv.uri) == got            # a second connection: the same server
    srv.kill9()
    again = servers.restart(srv)
    renewed = _nbd_instance(again.uri)
    assert renewed is not None and renewed != got


def test_no_instance_without_multi_conn_over_tcp_or_from_an_exited_listener(servers, tmp_path):
    # No multi-conn: a flush on a new connection need not cover the old one's writes.
    single = servers.nbdkit("memory", "8M", "multi-conn-mode=disable", filters=["multi-conn"])
    h = nbd.NBD()
    h.connect_uri(single.uri)
    assert not h.can_multi_conn()
    h.shutdown()
    assert _nbd_instance(single.uri) is None
    # TCP: nothing names the server process.
    tcp = nbdkit_tcp(servers, "inst", ["memory", "8M"])
    assert _nbd_instance(tcp.uri) is None
    # A daemonized nbdkit listens in a parent that exits: its pid names no server.
    sock, pidfile = tmp_path / "d.sock", tmp_path / "d.pid"
    assert os.system("nbdkit -U %s -P %s memory 8M" % (sock, pidfile)) == 0
    pid = wait_for_pidfile(pidfile)        # the child writes it after the parent exited
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        listener_pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        12))[0]
        got = server_instance(s.fileno())
        s.close()
        assert listener_pid != pid and got is None
    finally:
        os.kill(pid, 15)
