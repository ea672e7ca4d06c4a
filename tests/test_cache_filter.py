"""nbdkit's C cache filter in front of the plugin: which guarantees hold with it, and the
one that does not, which is why the launcher does not use it (docs/benchmarks.md,
"The cache filter").

The filter (`--filter=cache cache-on-read=true cache=writethrough`) would serve
warm 4K reads in C at about the file plugin's speed.  These tests run it for real.
"""

import re

import nbd

from conftest import make_image
from faults import wait_until
from helpers import Control

MiB = 1 << 20
CACHE = ["cache", "log"]           # outermost first: the log filter sees what reaches the plugin
_READ = re.compile(r"Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) ")


def _serve(servers, tmp_path, **params):
    base = make_image(tmp_path / "base.img", 8 * MiB, [(0, 8 * MiB)])
    log = tmp_path / "below-cache.log"
    srv = servers.overlay(tmp_path / "ov", base=base, filters=CACHE,
                          control=str(tmp_path / "ctl.sock"),
                          cache="writethrough", cache_on_read="true",
                          cache_max_size="16M", logfile=str(log), **params)
    return srv, base, log


def _reads_below(log):
    return [(int(o, 16), int(c, 16)) for o, c in _READ.findall(log.read_text())]


def _wait_done(h, cookie, timeout=10.0):
    def done():
        if h.aio_command_completed(cookie):
            return True
        h.poll(100)
        return False
    wait_until(done, timeout, interval=0)


def test_qmp_stop_cannot_hold_a_read_the_cache_serves(servers, tmp_path, connect):
    """The guarantee the filter breaks: QMP stop holds every client request at the
    disk's gate, but a read served from the cache never reaches the plugin.

    (The filter takes one lock around its block operations, so a hit waits
    behind a miss that the plugin holds: the hit goes first here.)"""
    srv, base, log = _serve(servers, tmp_path)
    qmp = Control(tmp_path / "ctl.sock")
    h = connect(srv.uri)
    warm = h.pread(4096, 0)                    # block 0 is now in the cache
    qmp("stop")
    try:
        warm_buf, cold_buf = nbd.Buffer(4096), nbd.Buffer(4096)
        hit = h.aio_pread(warm_buf, 0)
        _wait_done(h, hit)                     # served by the filter while the disk is stopped
        assert warm_buf.to_bytearray() == warm
        cold = h.aio_pread(cold_buf, 4 * MiB)  # not cached: reaches the plugin and is held
        _wait_logged(log, 4 * MiB)
        assert not h.aio_command_completed(cold), "the uncached read passed a stopped disk"
    finally:
        qmp("cont")
    _wait_done(h, cold)
    assert cold_buf.to_bytearray() == open(base, "rb").read()[4 * MiB:4 * MiB + 4096]
    qmp.close()


def _wait_logged(log, offset, timeout=10.0):
    """Until the log filter shows a read at offset reaching the plugin (it logs on entry)."""
    wait_until(lambda: any(o == offset for o, _ in _reads_below_entries(log)), timeout, 0.01)


_ENTRY = re.compile(r"Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) \.\.\.")


def _reads_below_entries(log):
    return [(int(o, 16), int(c, 16)) for o, c in _ENTRY.findall(log.read_text())]


def test_a_cold_4k_read_reads_a_whole_64k_block_below(servers, tmp_path, connect):
    """Read amplification: the filter fills whole blocks (cache-min-block-size, 64K)."""
    srv, base, log = _serve(servers, tmp_path)
    h = connect(srv.uri)
    before = len(_reads_below(log))
    assert h.pread(4096, 3 * MiB + 8192) == open(base, "rb").read()[3 * MiB + 8192:][:4096]
    reads = _reads_below(log)[before:]
    assert reads == [(3 * MiB, 65536)], reads
    # Warm: the same 4K again reaches nothing below.
    h.pread(4096, 3 * MiB + 8192)
    assert _reads_below(log)[before:] == reads


def test_writes_flush_and_a_pivot_stay_coherent_through_the_filter(servers, tmp_path, connect):
    """What holds: writethrough writes reach the overlay, and a mirror pivot (the
    content below changes store, not bytes) reads the same through the warm cache."""
    srv, base, log = _serve(servers, tmp_path)
    qmp = Control(tmp_path / "ctl.sock")
    h = connect(srv.uri)
    h.pwrite(b"W" * 65536, MiB)
    h.flush()
    whole = h.pread(8 * MiB, 0)                # every block warm
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(8 * MiB)
    qmp("drive-mirror", device="disk0", target=str(target), sync="full")
    qmp.wait_event("BLOCK_JOB_READY", device="disk0")
    qmp("block-job-complete", device="disk0")
    qmp.wait_event("BLOCK_JOB_COMPLETED", device="disk0")
    assert h.pread(8 * MiB, 0) == whole
    assert open(target, "rb").read() == whole
    h.pwrite(b"P" * 4096, 2 * MiB)             # after the pivot: through the cache to the target
    h.flush()
    assert h.pread(4096, 2 * MiB) == b"P" * 4096
    with open(target, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4096) == b"P" * 4096
    qmp.close()
