"""The overlay disk served by nbdkit: NBD semantics, copy-on-write, persistence."""

import shutil
import subprocess

import nbd
import pytest

from conftest import make_image, sha256_file

MiB = 1 << 20
CS = 64 * 1024


def run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def qemu_io(uri_or_path, *cmds, fmt="raw"):
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv, uri_or_path)
    assert "error" not in out.stdout.lower() + out.stderr.lower(), out.stdout + out.stderr
    assert "Pattern verification failed" not in out.stdout, out.stdout
    return out.stdout


@pytest.fixture
def base(tmp_path):
    """16 MiB sparse base: random data in a few places, holes elsewhere."""
    return make_image(tmp_path / "base.img", 16 * MiB,
                      [(0, MiB), (4 * MiB + 12345, 300000), (15 * MiB, MiB)], seed=1)


def test_reads_base_through_empty_overlay(servers, tmp_path, base):
    srv = servers.overlay(tmp_path / "ov", base=base)
    out = tmp_path / "out.img"
    run("nbdcopy", srv.uri, str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", base, str(out))


def test_unaligned_writes_read_back_and_match_expected_image(servers, tmp_path, base):
    srv = servers.overlay(tmp_path / "ov", base=base)
    expected = tmp_path / "expected.img"
    shutil.copy(base, expected)
    writes = ["write -P 0x11 1 100", "write -P 0x22 65530 20", "write -P 0x33 4000000 200000",
              "write -P 0x44 16776800 384", "write -z 2097152 131072", "write -P 0x55 9000000 4097"]
    qemu_io(srv.uri, *writes)
    qemu_io(str(expected), *writes)
    qemu_io(srv.uri, "read -P 0x11 1 100", "read -P 0x22 65530 20", "read -P 0x33 4000000 200000",
            "read -P 0x44 16776800 384", "read -P 0 2097152 131072", "read -P 0x55 9000000 4097")
    out = tmp_path / "out.img"
    run("nbdcopy", srv.uri, str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), str(out))


def test_nbdcopy_into_overlay_then_out_is_identical(servers, tmp_path, base):
    src = make_image(tmp_path / "src.img", 16 * MiB, [(0, 3 * MiB), (8 * MiB + 7, 5 * MiB)], seed=2)
    srv = servers.overlay(tmp_path / "ov", base=base)
    run("nbdcopy", src, srv.uri)
    out = tmp_path / "out.img"
    run("nbdcopy", srv.uri, str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src, str(out))


def test_base_is_never_written(servers, tmp_path, base):
    before = sha256_file(base)
    srv = servers.overlay(tmp_path / "ov", base=base)
    qemu_io(srv.uri, "write -P 0xaa 0 1M", "write -z 15M 1M", "discard 4M 1M", "flush")
    srv.stop()
    assert sha256_file(base) == before


def parse_map(text):
    rows = []
    for line in text.strip().splitlines():
        off, length, typ = line.split()[:3]
        rows.append((int(off), int(length), int(typ)))
    return rows


def type_at(rows, offset):
    for off, length, typ in rows:
        if off <= offset < off + length:
            return typ
    raise AssertionError("no extent at %d" % offset)


def test_map_merges_overlay_and_sparse_base(servers, tmp_path, base):
    srv = servers.overlay(tmp_path / "ov", base=base)
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert type_at(rows, 0) == 0                 # base data
    assert type_at(rows, 2 * MiB) == 3           # base hole: hole,zero
    assert type_at(rows, 15 * MiB + 10) == 0
    qemu_io(srv.uri, "write -P 1 8M 64k",        # overlay data over a base hole
            "write -z 0 1M",                      # zeroes over base data
            "discard 15M 1M")                     # trim over base data
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert type_at(rows, 8 * MiB) == 0
    assert type_at(rows, 8 * MiB + CS) == 3
    assert type_at(rows, 0) & 2 and type_at(rows, MiB - 1) & 2
    assert type_at(rows, 15 * MiB) & 2
    assert sum(length for _, length, _ in rows) == 16 * MiB
    qemu_io(srv.uri, "read -P 0 0 1M", "read -P 1 8M 64k")


def test_nbdcopy_skips_zero_ranges(servers, tmp_path, connect):
    """A 1 TiB blank disk copies to null quickly: every range carries the zero flag."""
    srv = servers.overlay(tmp_path / "ov", size="1T")
    h = connect(srv.uri)
    h.pwrite(b"x" * 4096, 512 * 1024 * MiB)
    run("nbdcopy", "--destination-is-zero", srv.uri, "null:")
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert [typ for _, _, typ in rows] == [3, 0, 3]


def test_partial_writes_to_one_cluster_from_many_clients_all_survive(servers, tmp_path, base, connect):
    """Hundreds of clusters, each hit by concurrent 512-byte writes on 4 connections."""
    srv = servers.overlay(tmp_path / "ov", base=base)
    handles = [connect(srv.uri) for _ in range(4)]
    nclusters = 256
    pieces = 8                       # each of these lands in a distinct part of the cluster
    cookies = []
    for c in range(nclusters):
        for p in range(pieces):
            h = handles[(c + p) % len(handles)]
            off = c * CS + p * 8192 + 100
            data = bytes([(c * pieces + p) % 251 + 1]) * 512
            cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)))
    for h in handles:
        while h.aio_in_flight() > 0:
            h.poll(-1)
    for h, cookie in cookies:
        assert h.aio_command_completed(cookie)
    with open(base, "rb") as f:
        expected = bytearray(f.read(nclusters * CS))
    for c in range(nclusters):
        for p in range(pieces):
            off = c * CS + p * 8192 + 100
            expected[off:off + 512] = bytes([(c * pieces + p) % 251 + 1]) * 512
    got = handles[0].pread(nclusters * CS, 0)
    assert got == bytes(expected)


def test_flushed_data_survives_kill_9(servers, tmp_path, base, connect):
    ov = tmp_path / "ov"
    srv = servers.overlay(ov, base=base)
    h = connect(srv.uri)
    h.pwrite(b"A" * 5000, 3 * MiB + 1)
    h.pwrite(b"B" * CS, 10 * MiB)
    h.flush()
    h.pwrite(b"C" * 100, 11 * MiB, nbd.CMD_FLAG_FUA)
    srv.kill9()
    srv = servers.overlay(ov)                 # base not repeated: remembered
    h = connect(srv.uri)
    assert h.pread(5000, 3 * MiB + 1) == b"A" * 5000
    assert h.pread(CS, 10 * MiB) == b"B" * CS
    assert h.pread(100, 11 * MiB) == b"C" * 100
    with open(base, "rb") as f:
        f.seek(3 * MiB)
        assert h.pread(1, 3 * MiB) == f.read(1)


def test_answered_writes_survive_kill_9_without_a_flush(servers, tmp_path, base, connect):
    """An acknowledged write is in the page cache, which kill -9 keeps: a client that
    reconnects (QEMU's reconnect-delay) resends only unanswered requests and its next
    flush succeeds, so the overlay must keep every answered write, flushed or not --
    copy-on-write into absent clusters, zeroes and trims included (the map journal)."""
    import random
    rng = random.Random(7)
    ov = tmp_path / "ov"
    size = 16 * MiB
    with open(base, "rb") as f:
        expected = bytearray(f.read())
    srv = servers.overlay(ov, base=base)
    for round_ in range(4):
        handles = [connect(srv.uri), connect(srv.uri)]
        cookies, batch = [], []
        for i in range(120):
            h = handles[i % 2]
            length = rng.choice((4096, 4096, 8192, 65536, 3 * 4096 + 512))
            while True:       # requests in flight together never overlap (order is free)
                offset = rng.randrange(0, size - length) // 512 * 512
                lo, hi = offset // CS * CS, -(-(offset + length) // CS) * CS
                if all(hi <= a or b <= lo for a, b in batch):
                    break
            batch.append((lo, hi))
            kind = rng.random()
            if kind < 0.8:
                data = rng.randbytes(length)
                expected[offset:offset + length] = data
                cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                                offset)))
            else:
                if kind < 0.9:
                    cookie = h.aio_zero(length, offset)
                    expected[offset:offset + length] = bytes(length)
                else:
                    # trim: whole clusters read as zeros after, partial ones are kept
                    first, end = -(-offset // CS) * CS, (offset + length) // CS * CS
                    cookie = h.aio_trim(length, offset)
                    if first < end:
                        expected[first:end] = bytes(end - first)
                cookies.append((h, cookie))
            if i % 16 == 15:                   # a batch of 16 in flight, then all answered
                for h2 in handles:
                    while h2.aio_in_flight() > 0:
                        h2.poll(-1)
                batch = []
        for h in handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)
        for h, cookie in cookies:
            assert h.aio_command_completed(cookie)
        srv.kill9()                            # no flush since the last restart
        srv = servers.restart(srv)
        got = connect(srv.uri).pread(size, 0)
        bad = [o for o in range(0, size, 4096) if got[o:o + 4096] != expected[o:o + 4096]]
        assert not bad, "round %d: %d blocks differ, first at %d" % (round_, len(bad), bad[0])
    assert "replayed changes made after the last flush" in srv.log()


def test_flush_on_one_connection_covers_writes_on_another(servers, tmp_path, connect):
    ov = tmp_path / "ov"
    srv = servers.overlay(ov, size="8M")
    a, b = connect(srv.uri), connect(srv.uri)
    assert a.can_multi_conn()
    a.pwrite(b"multi" * 1000, 12345)
    b.flush()
    srv.kill9()
    srv = servers.overlay(ov)
    assert connect(srv.uri).pread(5000, 12345) == b"multi" * 1000


def test_restart_serves_same_bytes(servers, tmp_path, base):
    ov = tmp_path / "ov"
    srv = servers.overlay(ov, base=base)
    qemu_io(srv.uri, "write -P 0x77 100000 300000", "write -z 0 4096")
    first = tmp_path / "first.img"
    run("nbdcopy", srv.uri, str(first))
    assert srv.stop() == 0
    srv = servers.overlay(ov)
    second = tmp_path / "second.img"
    run("nbdcopy", srv.uri, str(second))
    assert sha256_file(first) == sha256_file(second)


def test_size_not_a_multiple_of_cluster_size(servers, tmp_path, connect):
    size = 10 * MiB + 1234
    base = make_image(tmp_path / "odd.img", size, [(size - 70000, 70000)], seed=3)
    srv = servers.overlay(tmp_path / "ov", base=base)
    h = connect(srv.uri)
    assert h.get_size() == size
    h.pwrite(b"T" * 10, size - 10)
    h.zero(size - 1020, 1000)
    with open(base, "rb") as f:
        head = f.read(1000)
        f.seek(size - 20)
        tail = f.read(10)
    assert h.pread(size, 0) == head + bytes(size - 1020) + tail + b"T" * 10
    h.trim(CS // 2, size - CS // 2)
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert sum(length for _, length, _ in rows) == size


def test_fast_zero_of_whole_clusters_succeeds(servers, tmp_path, base, connect):
    srv = servers.overlay(tmp_path / "ov", base=base)
    h = connect(srv.uri)
    assert h.can_fast_zero()
    h.zero(2 * CS, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(2 * CS, 0) == bytes(2 * CS)


def test_fast_zero_of_part_of_a_data_cluster_is_refused_without_change(servers, tmp_path, base,
                                                                      connect):
    srv = servers.overlay(tmp_path / "ov", base=base)
    h = connect(srv.uri)
    before = h.pread(CS, 0)
    with pytest.raises(nbd.Error) as e:
        h.zero(4096, 100, nbd.CMD_FLAG_FAST_ZERO)
    assert e.value.errno == "ENOTSUP"
    assert h.pread(CS, 0) == before
    h.zero(4096, 100)                                  # the slow way works
    assert h.pread(CS, 0) == before[:100] + bytes(4096) + before[4196:]


def test_fast_zero_of_part_of_a_hole_succeeds(servers, tmp_path, base, connect):
    srv = servers.overlay(tmp_path / "ov", base=base)
    h = connect(srv.uri)
    h.zero(4096, 2 * MiB + 100, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4096, 2 * MiB + 100) == bytes(4096)


def test_nbd_base_served_by_another_nbdkit(servers, tmp_path, base, connect):
    base_srv = servers.nbdkit("file", base, "-r")
    srv = servers.overlay(tmp_path / "ov", base=base_srv.uri)
    h = connect(srv.uri)
    h.pwrite(b"over" * 1024, 4 * MiB + 12345 - 2048)
    out = tmp_path / "out.img"
    run("nbdcopy", srv.uri, str(out))
    expected = tmp_path / "expected.img"
    shutil.copy(base, expected)
    with open(expected, "r+b") as f:
        f.seek(4 * MiB + 12345 - 2048)
        f.write(b"over" * 1024)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), str(out))
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert type_at(rows, 2 * MiB) == 3                 # base hole seen through NBD extents


def test_cache_request_is_accepted(servers, tmp_path, base, connect):
    srv = servers.overlay(tmp_path / "ov", base=base)
    h = connect(srv.uri)
    assert h.can_cache()
    h.cache(MiB, 0)


def test_overlay_filesystem_full_is_enospc(servers, tmp_path, connect):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)])
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        srv = servers.overlay(mnt / "ov", size="64M")
        h = connect(srv.uri)
        with pytest.raises(nbd.Error) as e:
            for i in range(64):
                h.pwrite(b"F" * MiB, i * MiB)
        assert e.value.errno == "ENOSPC"
        h.pread(4096, 0)                               # still serving
        h.shutdown()                                   # nbdkit waits for its clients on SIGTERM
        assert srv.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)])



def test_restarted_nbd_base_is_reconnected(servers, tmp_path, base, connect):
    """A base NBD server that restarts on the same socket costs only a reconnect."""
    base_srv = servers.nbdkit("file", base, "-r")
    srv = servers.overlay(tmp_path / "ov", base=base_srv.uri)
    h = connect(srv.uri)
    with open(base, "rb") as f:
        expected = f.read(MiB)
    assert h.pread(MiB, 0) == expected
    base_srv.kill9()
    servers.restart(base_srv)
    assert h.pread(MiB, 0) == expected
    rows = parse_map(run("nbdinfo", "--map", srv.uri).stdout)
    assert type_at(rows, 2 * MiB) == 3
