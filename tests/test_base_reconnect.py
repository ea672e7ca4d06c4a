"""A base that is down for less than reconnect-delay is invisible to every request,
including one that finds no pooled connection left and has to open a new one (the soak,
issue 24: the second of two concurrent requests failed at once with ENOENT, seen by the
client as EINVAL, while the first waited for the base as it should)."""

import threading
import time

from conftest import make_image

MiB = 1 << 20


def test_concurrent_reads_while_the_base_is_down_wait_for_it(servers, tmp_path, connect):
    base_img = make_image(tmp_path / "base.img", 4 * MiB, [(0, 4 * MiB)], seed=3)
    expected = open(base_img, "rb").read()
    base = servers.nbdkit("file", base_img, "-r")
    disk = servers.overlay(tmp_path / "ov", base=base.uri, reconnect_delay="10")
    first, second = connect(disk.uri), connect(disk.uri)
    assert bytes(first.pread(4096, 0)) == expected[:4096]     # one pooled base connection
    base.kill9()
    got, errors = {}, []

    def read(name, h, offset):
        try:
            got[name] = bytes(h.pread(MiB, offset))
        except Exception as e:                               # reported below
            errors.append((name, e))

    a = threading.Thread(target=read, args=("a", first, MiB))
    a.start()
    time.sleep(0.3)               # a holds the lost connection's place, waiting for the base
    b = threading.Thread(target=read, args=("b", second, 2 * MiB))
    b.start()
    time.sleep(0.5)
    servers.restart(base)
    a.join(30)
    b.join(30)
    assert errors == []
    assert got == {"a": expected[MiB:2 * MiB], "b": expected[2 * MiB:3 * MiB]}
