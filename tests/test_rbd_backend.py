"""The native RBD backend and mirror target (plugin/backends/rbd.py) against a real
one-node Ceph cluster (tests/cephcluster.py), and qemu-nbd in front of RBD."""

import errno
import itertools
import os
import pathlib
import signal
import subprocess
import time

import pytest

from conftest import Server, make_image
from plugin import backends
from plugin.backends import rbd as plugin_rbd
from plugin.backends.rbdtarget import RbdTarget

MiB = 1 << 20
_names = itertools.count()


def new_image(cluster, size=32 * MiB, pool="rbd"):
    if pool not in _pools:
        cluster.create_pool(pool)
        _pools.add(pool)
    name = "img%d" % next(_names)
    return name, cluster.create_image(pool, name, size)


_pools = set()


@pytest.fixture(autouse=True, scope="module")
def _fresh_pools():
    _pools.clear()
    yield


# -- addresses (no cluster) -----------------------------------------------------

def test_parse_uri():
    a = plugin_rbd.parse_uri("rbd://pool/img?conf=/etc/ceph/x.conf&id=mirror&timeout=5")
    assert (a.pool, a.namespace, a.image, a.conf, a.client_id, a.timeout) == \
        ("pool", "", "img", "/etc/ceph/x.conf", "mirror", 5)
    a = plugin_rbd.parse_uri("rbd://pool/ns/img")
    assert (a.pool, a.namespace, a.image, a.conf, a.client_id, a.timeout) == \
        ("pool", "ns", "img", None, None, plugin_rbd.DEFAULT_TIMEOUT)
    assert str(a) == "rbd://pool/ns/img"
    assert plugin_rbd.parse_uri("rbd://p/i?timeout=0").timeout == 0


@pytest.mark.parametrize("bad", [
    "rbd://pool", "rbd://pool/", "rbd:///img", "rbd://a/b/c/d", "rbd://p//i",
    "rbd://p/i?conf=", "rbd://p/i?bogus=1", "rbd://p/i?timeout=-1", "rbd://p/i?timeout=x",
    "rbd://p/i?conf=a&conf=b", "nbd://p/i", "rbd://p/i?conf=ceph.conf",
])
def test_parse_uri_rejects(bad):
    with pytest.raises(ValueError) as e:
        plugin_rbd.parse_uri(bad)
    assert "\n" not in str(e.value)


def test_relative_conf_is_refused_with_a_clear_line():
    with pytest.raises(ValueError) as e:
        plugin_rbd.parse_uri("rbd://p/i?conf=ceph/ceph.conf")
    assert str(e.value) == ("rbd address conf=ceph/ceph.conf must be an absolute path "
                            "(the server runs in /)")


@pytest.mark.parametrize("opener", [
    lambda a: backends.open_backend(a, readonly=True), backends.open_target])
def test_open_by_scheme_refuses_a_bad_rbd_address_as_einval(opener):
    """rbd:// goes to the RBD backend (not a file path), whose bad address is EINVAL."""
    with pytest.raises(OSError) as e:
        opener("rbd://pool-only")
    assert e.value.errno == errno.EINVAL
    assert "rbd address must be rbd://POOL/IMAGE" in str(e.value)


# -- the backend ----------------------------------------------------------------

def test_round_trip(ceph_cluster):
    name, uri = new_image(ceph_cluster)
    data = os.urandom(3 * MiB)
    b = plugin_rbd.RbdBackend(uri, readonly=False)
    try:
        assert b.size() == 32 * MiB
        b.write(data, 5 * MiB)
        b.write(memoryview(data)[:4096], 0, fua=True)
        b.zero(6 * MiB, 4096)
        b.zero(7 * MiB, 1 * MiB, may_trim=True)
        b.flush()
        buf = bytearray(3 * MiB)
        b.readinto(buf, 5 * MiB)
        expect = bytearray(data)
        expect[MiB:MiB + 4096] = bytes(4096)
        expect[2 * MiB:] = bytes(MiB)
        assert buf == expect
    finally:
        b.close()
    image = ceph_cluster.export_image("rbd", name)
    assert image[:4096] == data[:4096]
    assert image[5 * MiB:8 * MiB] == expect
    assert image.count(0, 4096, 5 * MiB) == 5 * MiB - 4096
    assert image.count(0, 8 * MiB) == 24 * MiB


def test_read_only_refuses_writes(ceph_cluster):
    _, uri = new_image(ceph_cluster)
    b = plugin_rbd.RbdBackend(uri, readonly=True)
    try:
        with pytest.raises(OSError) as e:
            b.write(b"x" * 512, 0)
        assert e.value.errno == errno.EROFS
    finally:
        b.close()


def test_extents_skip_zero_ranges(ceph_cluster):
    _, uri = new_image(ceph_cluster, size=64 * MiB)
    b = plugin_rbd.RbdBackend(uri, readonly=False)
    try:
        assert b.extents(0, 64 * MiB) == [(0, 64 * MiB, True)]
        b.write(b"a" * 4096, 9 * MiB)          # object 2 (4 MiB objects)
        b.write(b"b" * 4096, 40 * MiB)         # object 10
        ext = b.extents(0, 64 * MiB)
        # Covers the range in order, no gaps.
        pos = 0
        for o, n, _ in ext:
            assert o == pos and n > 0
            pos += n
        assert pos == 64 * MiB
        data = [(o, n) for o, n, zero in ext if not zero]
        # Each written byte is in a data extent; everything else is at most
        # the rest of the written objects.
        for off in (9 * MiB, 40 * MiB):
            assert any(o <= off and off + 4096 <= o + n for o, n in data)
        assert sum(n for _, n in data) <= 2 * 4 * MiB
        # A sub-range, and a range past the end (reads as zero).
        assert b.extents(16 * MiB, 8 * MiB) == [(16 * MiB, 8 * MiB, True)]
        tail = b.extents(60 * MiB, 8 * MiB)
        assert tail == [(60 * MiB, 8 * MiB, True)]
        # A zeroed object is no longer data.
        b.zero(8 * MiB, 4 * MiB, may_trim=True)
        assert not any(o <= 9 * MiB < o + n for o, n, zero in b.extents(0, 64 * MiB) if not zero)
    finally:
        b.close()


def test_missing_image_and_pool_are_enoent(ceph_cluster):
    new_image(ceph_cluster)      # the pool exists
    for uri in (ceph_cluster.uri("rbd", "no-such-image"), ceph_cluster.uri("no-such-pool", "x")):
        with pytest.raises(OSError) as e:
            plugin_rbd.RbdBackend(uri, readonly=True)
        assert e.value.errno == errno.ENOENT, e.value
        assert "\n" not in str(e.value)


def test_missing_conf_is_an_error(tmp_path):
    with pytest.raises(OSError) as e:
        plugin_rbd.RbdBackend("rbd://p/i?conf=%s" % (tmp_path / "none.conf"), readonly=True)
    assert e.value.errno == errno.ENOENT


def _full_pool(cluster, pool):
    """A pool over its quota: 2 MiB written, a 1 MiB quota, the flag set."""
    name, uri = new_image(cluster, size=32 * MiB, pool=pool)
    b = plugin_rbd.RbdBackend(uri, readonly=False)
    b.write(b"q" * (2 * MiB), 0)
    b.flush()
    cluster.set_pool_quota(pool, max_bytes=MiB)
    cluster.wait_pool_full(pool)
    return name, uri, b


def test_pool_quota_is_enospc(ceph_cluster):
    _, uri, b = _full_pool(ceph_cluster, "quota1")
    try:
        with pytest.raises(OSError) as e:
            b.write(b"n" * 4096, 8 * MiB)          # a new object: over the quota
        assert e.value.errno == errno.ENOSPC, e.value
        ceph_cluster.set_pool_quota("quota1", max_bytes=0)
        ceph_cluster.wait_pool_full("quota1", full=False)
        b.write(b"n" * 4096, 8 * MiB)
        b.flush()
        buf = bytearray(4096)
        b.readinto(buf, 8 * MiB)
        assert buf == b"n" * 4096
    finally:
        b.close()


# -- the mirror target ------------------------------------------------------------

def _drain(target, timeout=60):
    """Every completion until none is in flight: {tag: errno}."""
    got = {}
    deadline = time.monotonic() + timeout
    while target.in_flight():
        assert time.monotonic() < deadline, "target requests did not complete"
        for tag, err in target.wait(1.0):
            assert tag not in got
            got[tag] = err
    return got


def test_async_target_writes_land(ceph_cluster):
    name, uri = new_image(ceph_cluster, size=16 * MiB)
    t = RbdTarget(uri)
    assert t.wait_open(60)
    try:
        assert t.size() == 16 * MiB and t.multi_conn
        assert t.extents(0, 16 * MiB) == [(0, 16 * MiB, True)]
        expect = bytearray(16 * MiB)
        tags = []
        chunk = 256 * 1024
        for i in range(0, 12 * MiB, chunk):
            buf = bytearray(os.urandom(chunk))
            # A whole bytearray's view (not copied), a part of one (copied), bytes.
            data = (memoryview(buf), memoryview(buf + bytes(7))[:chunk], bytes(buf))[i % 3]
            t.submit_write(data, i, ("w", i))
            expect[i:i + chunk] = buf
            buf[:] = bytes(chunk)                  # reusable at once: librbd copied it
            tags.append(("w", i))
        assert t.in_flight() > 0
        t.submit_zero(4 * MiB, 4 * MiB, "z")
        tags.append("z")
        done = _drain(t)
        expect[4 * MiB:8 * MiB] = bytes(4 * MiB)
        t.submit_flush("f")
        done.update(_drain(t))
        assert done == {tag: 0 for tag in tags + ["f"]}
        assert t.reconnect() is True and t.losses == 0      # usable: nothing to reopen
        assert t.wait(0) == []
    finally:
        t.close()
    assert ceph_cluster.export_image("rbd", name) == expect


def test_async_target_pool_quota_is_enospc(ceph_cluster):
    name, uri, b = _full_pool(ceph_cluster, "quota2")
    b.close()
    t = RbdTarget(uri)
    assert t.wait_open(60)
    try:
        t.submit_write(b"n" * 4096, 8 * MiB, "new")
        t.submit_write(b"o" * 4096, 0, "overwrite")   # rewrites within the quota'd data pass
        assert _drain(t) == {"new": errno.ENOSPC, "overwrite": 0}
    finally:
        t.close()
        ceph_cluster.set_pool_quota("quota2", max_bytes=0)


@pytest.mark.parametrize("timeout", [5, 0])
def test_blocklisted_target_reconnects_and_fails_the_old_requests_once(ceph_cluster, timeout):
    """A client shut out of the cluster (ceph osd blocklist) gets ESHUTDOWN, with or
    without a timeout; reconnect() opens a new one, and requests still pending on the
    old handle come back (ENOTCONN) exactly once."""
    import json
    name, uri = new_image(ceph_cluster, size=16 * MiB)
    t = RbdTarget("%s&timeout=%d" % (uri, timeout))
    assert t.wait_open(60)
    addr = None
    try:
        t.submit_write(b"a" * 4096, 0, "first")
        assert _drain(t) == {"first": 0}
        status = json.loads(ceph_cluster.rbd("status", "--format", "json", "rbd/" + name))
        addr = status["watchers"][0]["address"]
        ceph_cluster.ceph("osd", "blocklist", "add", addr)
        tags = ["w%d" % i for i in range(8)]
        for i, tag in enumerate(tags):
            t.submit_write(bytearray(b"b" * 65536), i * 65536, tag)
        got = {}
        while t.in_flight():
            for tag, err in t.wait(5.0):
                assert tag not in got
                got[tag] = err
            if t._dead:
                assert t.reconnect() is True
        assert set(got) == set(tags)
        assert set(got.values()) <= {errno.ESHUTDOWN, errno.ENOTCONN}
        assert errno.ESHUTDOWN in got.values()
        assert t.losses == 1                 # one reopen; usable now, nothing more to do
        assert t.reconnect() is True and t.losses == 1
        t.submit_write(b"c" * 4096, 0, "after")
        t.submit_flush("flush")
        assert _drain(t) == {"after": 0, "flush": 0}
    finally:
        t.close()
        if addr is not None:
            ceph_cluster.ceph("osd", "blocklist", "rm", addr)
    assert ceph_cluster.export_image("rbd", name)[:4096] == b"c" * 4096


# -- qemu-nbd in front of RBD -------------------------------------------------------

def test_qemu_nbd_serves_rbd(ceph_cluster, servers, tmp_path):
    name, _ = new_image(ceph_cluster, size=16 * MiB)
    src = make_image(tmp_path / "src.img", 16 * MiB, [(0, MiB), (5 * MiB, 3 * MiB)], seed=13)
    sock = tmp_path / "qemu-nbd.sock"
    argv = ["qemu-nbd", "-k", str(sock), "-t", "--cache=none", "--image-opts",
            ceph_cluster.qemu_image_opts("rbd", name)]
    server = Server(argv, sock, tmp_path / "qemu-nbd.log")
    servers.started.append(server)        # killed by pid at the end of the test
    server.wait_ready()
    uri = "nbd+unix:///?socket=%s" % sock
    subprocess.run(["nbdcopy", src, uri], check=True, timeout=120)
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
    server.stop()
    want = pathlib.Path(src).read_bytes()
    assert out.read_bytes() == want
    assert ceph_cluster.export_image("rbd", name) == want


# -- a stopped OSD (last: it pauses the module's cluster) ---------------------------

def test_stopped_osd_times_out_then_recovers(ceph_cluster):
    """librbd waits on a stopped OSD; the address's timeout bounds that wait."""
    name, uri = new_image(ceph_cluster, size=8 * MiB)
    b = plugin_rbd.RbdBackend(uri + "&timeout=2", readonly=False)
    t = RbdTarget(uri + "&timeout=2")
    assert t.wait_open(60)
    osd = ceph_cluster.osd_pid()
    os.kill(osd, signal.SIGSTOP)
    try:
        with pytest.raises(OSError) as e:
            b.write(b"s" * 4096, 0)
        assert e.value.errno == errno.ETIMEDOUT
        t.submit_write(b"t" * 4096, MiB, "w")
        assert _drain(t) == {"w": errno.ETIMEDOUT}
    finally:
        os.kill(osd, signal.SIGCONT)
    try:
        b.write(b"s" * 4096, 0)
        t.submit_write(b"t" * 4096, MiB, "w")
        t.submit_flush("f")
        assert _drain(t) == {"w": 0, "f": 0}
        b.flush()
    finally:
        b.close()
        t.close()
    image = ceph_cluster.export_image("rbd", name)
    assert image[:4096] == b"s" * 4096 and image[MiB:MiB + 4096] == b"t" * 4096


def test_whole_bytearrays_go_to_librbd_uncopied():
    ba = bytearray(b"abcdefgh")
    assert plugin_rbd._whole_buffer(ba) is ba
    assert plugin_rbd._whole_buffer(memoryview(ba)) is ba
    part = plugin_rbd._whole_buffer(memoryview(ba)[2:5])
    assert part == b"cde" and isinstance(part, bytes)
    assert plugin_rbd._whole_buffer(memoryview(b"xyz")) == b"xyz"


def test_target_close_does_not_wait_for_a_hung_osd(ceph_cluster):
    """timeout=0: a write to a stopped OSD stays pending; close() still returns."""
    name, uri = new_image(ceph_cluster, size=8 * MiB)
    t = RbdTarget(uri + "&timeout=0")
    assert t.wait_open(60)
    osd = ceph_cluster.osd_pid()
    os.kill(osd, signal.SIGSTOP)
    try:
        t.submit_write(b"h" * 4096, 0, "hung")
        assert t.wait(0.5) == [] and t.in_flight() == 1
        t.close()
        assert t.in_flight() == 0
    finally:
        os.kill(osd, signal.SIGCONT)
    # The abandoned write may still land; the cluster is unharmed.
    b = plugin_rbd.RbdBackend(uri, readonly=False)
    try:
        b.write(b"n" * 4096, MiB)
        b.flush()
    finally:
        b.close()
    assert ceph_cluster.export_image("rbd", name)[MiB:MiB + 4096] == b"n" * 4096
