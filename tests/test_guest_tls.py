"""The test guest boots from the overlay disk served over TCP by nbdkit's own --tls=require.

scripts/nbdkit-overlay serves the plugin on 127.0.0.1 with --tls=require (a PSK, or X.509
certificates); QEMU (qemu-system-x86_64) attaches its virtio-blk drive over NBD with
tls-creds (an object tls-creds-psk or tls-creds-x509).  The guest writes and reads back;
a second TLS client sees every write on the disk, a plain client is refused, and after the
server is stopped the overlay state, served again on a Unix socket, still holds them.
"""

import nbd
import pytest

import guest
from conftest import LAUNCHER, make_image
from netrig import MiB, TcpServer, free_port, psk_file, x509_dirs
from test_target_tls import _aes_policy_applies, _negotiated

SIZE = 32 * MiB


def serve_with_tls(servers, tmp_path, kind):
    """The overlay disk on 127.0.0.1 behind nbdkit --tls=require; returns (server,
    QEMU -object for the client credentials, a libnbd handle maker over TLS)."""
    base = make_image(tmp_path / "base.img", SIZE, [(0, 2 * MiB), (20 * MiB, MiB)], seed=11)
    port = free_port()
    if kind == "psk":
        psk = psk_file(tmp_path)
        tls = ["--tls=require", "--tls-psk=%s" % psk]
        # QEMU reads keys.psk from dir=.
        creds = "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice" % psk.parent
        uri = "nbds://alice@127.0.0.1:%d/?tls-psk-file=%s" % (port, psk)
    else:
        server_dir, client_dir = x509_dirs(tmp_path)
        tls = ["--tls=require", "--tls-certificates=%s" % server_dir]
        # QEMU reads ca-cert.pem, client-cert.pem and client-key.pem from dir=.
        creds = "tls-creds-x509,id=tls0,endpoint=client,dir=%s" % client_dir
        uri = "nbds://127.0.0.1:%d/?tls-certificates=%s" % (port, client_dir)
    argv = [str(LAUNCHER), "-f", "-v", "-D", "nbdkit.tls.session=1",
            "-i", "127.0.0.1", "-p", str(port), *tls,
            "overlay=%s" % (tmp_path / "ov"), "base=%s" % base]
    server = TcpServer(argv, "127.0.0.1", port, tmp_path / "tls-disk.log", uri)
    servers.started.append(server)
    server.wait_ready()
    return server, base, creds


def tls_handle(uri):
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)     # tls-psk-file= / tls-certificates= in the URI
    h.connect_uri(uri)
    return h


def boot_over_tls(server, creds, tmp_path, guest_image, mode_args):
    """The guest's drive: NBD over inet to the server, with tls-creds=tls0."""
    options = {"server": {"type": "inet", "host": "127.0.0.1", "port": str(server.port)},
               "tls-creds": "tls0"}
    # nbd_socket is unused: the inet server above replaces the default unix one.
    return guest.run_guest(tmp_path / "unused.sock", mode_args, image=guest_image,
                           log_path=tmp_path / "guest.log", timeout=90,
                           blockdev_options=options, qemu_args=["-object", creds])


@pytest.mark.guest
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["psk", "x509"])
def test_guest_writes_over_tls_are_on_the_disk_and_plain_clients_are_refused(
        servers, tmp_path, guest_image, kind):
    server, base, creds = serve_with_tls(servers, tmp_path, kind)

    result = boot_over_tls(server, creds, tmp_path, guest_image,
                           {"mode": "writeread", "seed": 17, "count": 24})

    result.raise_if_failed()
    assert len(result.writes) == 24
    assert result.disk_bytes == SIZE
    # A second client over TLS sees the guest's writes, and the base under them.
    h = tls_handle(server.uri)
    assert guest.check_writes(result, h) == []
    written = {s for w in result.writes
               for s in range(w.offset // 512, (w.offset + w.length) // 512)}
    untouched = next(off for off in range(0, 2 * MiB, 4096)
                     if not written & set(range(off // 512, off // 512 + 8)))
    with open(base, "rb") as f:
        f.seek(untouched)
        assert h.pread(4096, untouched) == f.read(4096)
    h.shutdown()
    # A plain client is refused: the server requires TLS.
    plain = nbd.NBD()
    with pytest.raises(nbd.Error):
        plain.connect_uri("nbd://127.0.0.1:%d/" % server.port)
    assert server.proc.poll() is None
    # QEMU's session is AES-GCM, not ChaCha20 (scripts/tls-prefer-aes.conf), where it applies.
    ciphers = _negotiated(server)
    assert ciphers
    if _aes_policy_applies():
        assert not [c for c in ciphers if "CHACHA" in c], ciphers
    # The writes are in the overlay's state: stopped and served again on a Unix socket.
    assert server.stop() == 0
    again = servers.overlay(tmp_path / "ov", base=base)
    assert guest.check_writes(result, again.uri) == []
