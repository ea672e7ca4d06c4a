"""The asynchronous mirror target (plugin/backends/target.py) over TLS.

libnbd 1.14 hands one 16 KiB TLS record to the socket per state-machine step;
NbdTarget pushes the rest of a request at once (its _pump).  These tests drive
NbdTarget directly against nbdkit --tls=require on 127.0.0.1: many large
writes, zeroes and flushes in flight give an exact copy, and a 1 MiB write is
in the socket when submit_write returns.
"""

import random

import pytest

from netrig import MiB, nbdkit_tcp, psk_file, x509_dirs
from plugin.backends.nbdtarget import NbdTarget

SIZE = 32 * MiB


def open_target(servers, tmp_path, kind):
    path = tmp_path / "target.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    tls = {"psk": psk_file(tmp_path)} if kind == "psk" else {"x509": x509_dirs(tmp_path)}
    server = nbdkit_tcp(servers, "tls-target", ["file", str(path)], **tls)
    target = NbdTarget(server.uri)
    assert target.wait_open(10)
    return target, path


def drain(target):
    done = []
    while target.in_flight():
        done += target.wait(1.0)
    return done


@pytest.mark.parametrize("kind", ["psk", "x509"])
def test_many_large_writes_zeroes_and_flushes_in_flight_give_an_exact_copy(servers, tmp_path,
                                                                           kind):
    target, path = open_target(servers, tmp_path, kind)
    rnd = random.Random(5)
    expected = bytearray(SIZE)
    with open(path, "r+b") as f:           # something for the zeroes to clear
        f.write(b"\xee" * SIZE)
    expected[:] = b"\xee" * SIZE
    tags = []
    try:
        for i in range(SIZE // MiB):
            offset = i * MiB
            if i % 5 == 3:
                target.submit_zero(offset, MiB, ("zero", i))
                expected[offset:offset + MiB] = bytes(MiB)
            else:
                # Odd lengths too: a request that ends inside a TLS record.
                n = MiB - (i % 3) * 4096 - (512 if i % 7 == 1 else 0)
                buf = bytearray(rnd.randbytes(n))
                target.submit_write(buf, offset, ("write", i))
                expected[offset:offset + n] = buf
            tags.append(("zero" if i % 5 == 3 else "write", i))
            if i % 8 == 7:
                target.submit_flush(("flush", i))
                tags.append(("flush", i))
        done = drain(target)
        target.submit_flush("last")
        done += drain(target)
    finally:
        target.close()
    assert sorted(done, key=str) == sorted([(t, 0) for t in tags + ["last"]], key=str)
    assert path.read_bytes() == bytes(expected)


def test_a_1_mib_write_over_tls_is_in_the_socket_when_submit_returns(servers, tmp_path):
    target, path = open_target(servers, tmp_path, "psk")
    import nbd
    try:
        data = bytearray(random.Random(2).randbytes(MiB))
        target.submit_write(data, 3 * MiB, "w")
        # Nothing of it is left queued in libnbd: the socket took it all
        # (its send buffer is grown to 4 MiB), not just one 16 KiB record.
        assert not target._h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE
        assert drain(target) == [("w", 0)]
    finally:
        target.close()
    with open(path, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data


# -- the cipher scripts/nbdkit-overlay gets (scripts/tls-prefer-aes.conf) -----------------

def _aes_policy_applies():
    import os
    with open("/proc/cpuinfo") as f:
        has_aes = " aes " in f.read().replace("\n", " ")
    return (has_aes and not os.path.exists("/etc/gnutls/config")
            and "GNUTLS_SYSTEM_PRIORITY_FILE" not in os.environ)


def _negotiated(server):
    """The ciphers nbdkit -v -D nbdkit.tls.session=1 logged, one per TLS connection."""
    import re
    # "(TLS1.3)--(AES-128-GCM)" with a PSK, "(TLS1.3)-(ECDHE-..)-(RSA-..)-(AES-256-GCM)" else.
    return set(re.findall(r"TLS session: .*\(([A-Z0-9-]+)\)[ \t]*$", server.log(), re.M))


@pytest.mark.skipif(not _aes_policy_applies(), reason="no AES instructions, or a GnuTLS "
                    "policy of the machine's own: the launcher leaves the cipher alone")
@pytest.mark.parametrize("chacha,cipher", [("0", "AES-128-GCM"), ("1", "CHACHA20-POLY1305")])
def test_the_launcher_mirrors_over_tls_psk_with_aes_gcm_unless_told(servers, tmp_path, connect,
                                                                   monkeypatch, chacha, cipher):
    from netrig import Rig
    monkeypatch.setenv("OVERLAY_TLS_CHACHA", chacha)
    rig = Rig(servers, tmp_path, connect)            # served by scripts/nbdkit-overlay
    rig.h.pwrite(b"aes" * 4096, 2 * MiB)
    target = nbdkit_tcp(servers, "tls-target", ["-v", "-D", "nbdkit.tls.session=1", "file",
                                                str(rig.target_path)], psk=psk_file(tmp_path))
    rig.mirror(target.uri)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    expected = rig.disk_bytes()
    rig.qmp("block-job-cancel", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert rig.target_bytes() == expected
    assert _negotiated(target) == {cipher}


def test_the_launcher_passes_an_option_value_with_an_equals_sign_to_nbdkit(servers, tmp_path):
    """`-D nbdkit.tls.session=1` is nbdkit's debug flag, not a plugin key (and the disk
    served with --tls through the launcher negotiates AES-GCM where the policy applies)."""
    from conftest import LAUNCHER
    from netrig import TcpServer, free_port
    import nbd
    psk, port = psk_file(tmp_path), free_port()
    argv = [str(LAUNCHER), "-f", "-v", "-D", "nbdkit.tls.session=1", "-i", "127.0.0.1",
            "-p", str(port), "--tls", "require", "--tls-psk", str(psk),
            "overlay=%s" % (tmp_path / "ov"), "size=4M"]
    server = TcpServer(argv, "127.0.0.1", port, tmp_path / "disk.log",
                       "nbds://alice@127.0.0.1:%d/?tls-psk-file=%s" % (port, psk))
    servers.started.append(server)
    server.wait_ready()
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(server.uri)
    assert h.get_size() == 4 * MiB
    h.shutdown()
    ciphers = _negotiated(server)
    assert len(ciphers) == 1
    if _aes_policy_applies():
        assert ciphers == {"AES-128-GCM"}
