"""Bitmaps of a 1 TiB disk at 64 KiB granularity stay within the memory goal (RSS < 100 MiB).

A 64 KiB-granularity bitmap of 1 TiB has 16 Mi granules: packed, 2 MiB (a byte per
granule would be 16 MiB each).  The server keeps two full bitmaps (one persistent),
merges them, saves them at a stop, and its peak resident size stays under 100 MiB.
"""

import nbd

from bitmap_rig import extents, our_bitmaps
from helpers import Control

TiB = 1 << 40
CHUNK = 2 << 30


def _peak_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM for pid %d" % pid)


def test_two_full_bitmaps_of_a_1_tib_disk_fit_in_100_mib(servers, tmp_path):
    srv = servers.overlay(tmp_path / "ov", size="1T")
    control = Control(srv.control)
    control("block-dirty-bitmap-add", node="disk0", name="p", persistent=True,
            granularity=65536)
    control("block-dirty-bitmap-add", node="disk0", name="m", granularity=65536)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for offset in range(0, TiB, CHUNK):        # every granule of both bitmaps dirty
        h.zero(CHUNK, offset)
    h.flush()
    h.shutdown()
    control("block-dirty-bitmap-add", node="disk0", name="q", persistent=True, disabled=True)
    control("block-dirty-bitmap-merge", node="disk0", target="q", bitmaps=["p", "m"])
    assert {b["name"]: b["count"] for b in our_bitmaps(control)} == {
        "p": TiB, "m": TiB, "q": TiB}
    assert extents(control, "p") == [(0, TiB)]
    peak = _peak_rss(srv.pid)
    control.close()
    assert srv.stop() == 0
    assert peak < 100 << 20, "peak RSS %.1f MiB" % (peak / (1 << 20))
