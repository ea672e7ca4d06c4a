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
from plugin.backends.target import NbdTarget

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
