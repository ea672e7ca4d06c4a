"""Damaged bitmap files are refused at start-up with one line, and nothing is rewritten.

A good state directory with two persistent bitmaps (one disabled) is made by a real
nbdkit; each case copies it, damages a file of STATE_DIR/bitmaps/ and starts nbdkit:
it must exit non-zero with ONE line naming the file, and every file must hash the
same afterwards (test_state_damage.py does the same for the rest of the directory).
What is not damage: a torn copy (a crash during a save: the other copy is used) and
a leftover .tmp (removed).
"""

import os
import shutil
import struct
import zlib

import nbd
import pytest

from bitmap_rig import MiB, extents, our_bitmaps
from helpers import Control
from test_state_damage import one_error_line, run_nbdkit, snapshot

SIZE = 8 * MiB
A = "bitmaps/00000001.bitmap"      # "rec", recording, 64K
B = "bitmaps/00000002.bitmap"      # "off", disabled, 1M
R = "bitmaps/regions"
HEADER = 4096                      # header bytes of both files (short names)
STRIDE_A = 4096                    # 32 + 16 bytes of bits, one block per copy


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from conftest import Servers
    root = tmp_path_factory.mktemp("golden")
    servers = Servers(root)
    try:
        srv = servers.overlay(root / "ov", size=SIZE)
        control = Control(srv.control)
        control("block-dirty-bitmap-add", node="disk0", name="rec", persistent=True)
        control("block-dirty-bitmap-add", node="disk0", name="off", persistent=True,
                granularity=MiB)
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"a" * 4096, 0)
        control("block-dirty-bitmap-disable", node="disk0", name="off")
        h.pwrite(b"b" * 4096, 5 * MiB)
        h.shutdown()
        control("block-dirty-bitmap-clear", node="disk0", name="rec")   # copy 2 now
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"c" * 4096, 3 * MiB)
        h.shutdown()
        control.close()
        assert srv.stop() == 0
    finally:
        servers.cleanup()
    return root


def _crc(data):
    return struct.pack("<I", zlib.crc32(data))


def poke(name, offset, data, crc_end=None, crc_at=None, name_bytes=0):
    """Overwrite bytes; with crc_end, recompute the crc32 (of 0..crc_end plus the
    name, for a bitmap header) at crc_at, so only the checked field is wrong."""
    def edit(ov):
        path = ov / name
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data)
            if crc_end is not None:
                f.seek(0)
                head = f.read(crc_end)
                f.seek(64)
                extra = f.read(name_bytes)
                f.seek(crc_at)
                f.write(_crc(head + extra))
    return edit


def truncate(name, delta):
    def edit(ov):
        os.truncate(ov / name, os.path.getsize(ov / name) + delta)
    return edit


def remove(name):
    def edit(ov):
        os.unlink(ov / name)
    return edit


def write(name, content):
    def edit(ov):
        (ov / name).write_bytes(content)
    return edit


def both_copies_bad(ov):
    for k in (0, 1):
        poke(A, HEADER + k * STRIDE_A + 32, b"\xff")(ov)


def duplicate(ov):
    shutil.copy(ov / A, ov / "bitmaps" / "00000009.bitmap")


def bitmaps_a_file(ov):
    shutil.rmtree(ov / "bitmaps")
    (ov / "bitmaps").write_text("x")


def region_field(offset, fmt, value):
    return poke(R, offset, struct.pack(fmt, value), crc_end=60, crc_at=60)


def bitmap_field(offset, fmt, value, name_bytes=3):
    return poke(A, offset, struct.pack(fmt, value), crc_end=60, crc_at=60,
                name_bytes=name_bytes)


# (id, damage, file the line must name, text the line must hold)
CASES = [
    ("regions-missing", remove(R), "bitmaps/regions", "missing"),
    ("regions-truncated", truncate(R, -1), "bitmaps/regions", "need"),
    ("regions-extended", truncate(R, 1), "bitmaps/regions", "need"),
    ("regions-short-header", write(R, b"x"), "bitmaps/regions", "shorter than its"),
    ("regions-bad-magic", poke(R, 0, b"NOTREGNS"), "bitmaps/regions", "bad magic"),
    ("regions-bad-crc", poke(R, 20, b"\x01"), "bitmaps/regions", "checksum"),
    ("regions-newer-version", region_field(8, "<I", 2), "bitmaps/regions", "newer server"),
    ("regions-other-size", region_field(16, "<Q", SIZE * 2), "bitmaps/regions", "size is"),
    ("regions-byte-2", poke(R, 64 + 3, b"\x02"), "bitmaps/regions", "0x02 for region 3"),
    ("bitmap-truncated", truncate(A, -1), A, "needs"),
    ("bitmap-extended", truncate(A, 4096), A, "needs"),
    ("bitmap-empty", write(A, b""), A, "shorter than its"),
    ("bitmap-bad-magic", poke(A, 0, b"NOTABITM"), A, "bad magic"),
    ("bitmap-name-changed", poke(A, 64, b"X"), A, "checksum"),
    ("bitmap-newer-version", bitmap_field(8, "<I", 7), A, "newer server"),
    ("bitmap-granularity-3", bitmap_field(24, "<Q", 3), A, "granularity 3"),
    ("bitmap-other-size", bitmap_field(16, "<Q", SIZE // 2), A, "size is"),
    ("bitmap-both-copies-bad", both_copies_bad, A, "neither saved copy"),
    ("bitmap-duplicate-name", duplicate, "00000009.bitmap", "is also in"),
    ("bitmaps-unknown-file", write("bitmaps/notes.txt", b"hi"), "notes.txt", "unknown file"),
    ("bitmaps-a-file", bitmaps_a_file, "bitmaps", "not a directory"),
    ("bitmap-a-directory", lambda ov: (os.unlink(ov / B), os.mkdir(ov / B)), B,
     "not a regular file"),
]


def _copy(golden, tmp_path):
    ov = tmp_path / "ov"
    shutil.copytree(golden / "ov", ov)
    return ov


@pytest.mark.parametrize("damage,names,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_bitmap_file_is_refused_and_left_as_it_was(golden, tmp_path, damage, names,
                                                          text):
    ov = _copy(golden, tmp_path)
    damage(ov)
    before = snapshot(ov)
    line = one_error_line(run_nbdkit(tmp_path, "overlay=%s" % ov))
    assert names in line and text in line, line
    assert snapshot(ov) == before


def _serve(servers, ov):
    srv = servers.overlay(ov)
    control = Control(srv.control)
    return srv, control


def test_the_good_copy_serves_its_bitmaps(golden, tmp_path, servers):
    """The control case: undamaged, both bitmaps come back as they were saved."""
    ov = _copy(golden, tmp_path)
    srv, control = _serve(servers, ov)
    info = {b["name"]: b for b in our_bitmaps(control)}
    assert info["rec"]["recording"] and not info["off"]["recording"]
    assert extents(control, "rec") == [(3 * MiB, 65536)]
    assert extents(control, "off") == [(0, MiB)]
    control.close()


def test_a_torn_copy_is_a_crash_not_damage(golden, tmp_path, servers):
    """A crash during a save of "rec" (after the write at 3 MiB): its new copy fails
    its checksum and the region of the write is still set, as a save clears regions
    only once it completed.  The older copy is used, with the set region added."""
    ov = _copy(golden, tmp_path)
    newest = max(_generations(ov))
    with open(ov / A, "r+b") as f:
        for k in (0, 1):
            f.seek(HEADER + k * STRIDE_A + 8)
            if struct.unpack("<Q", f.read(8))[0] == newest:
                f.seek(HEADER + k * STRIDE_A + 32)
                f.write(b"\x55")
    with open(ov / R, "r+b") as f:
        f.seek(64 + 3)                           # region 3: [3 MiB, 4 MiB)
        f.write(b"\x01")
    srv, control = _serve(servers, ov)
    assert extents(control, "rec") == [(3 * MiB, MiB)]   # the older copy (empty) + region
    assert extents(control, "off") == [(0, MiB)]         # disabled: its copy, exactly
    control.close()


def _generations(ov):
    with open(ov / A, "rb") as f:
        out = []
        for k in (0, 1):
            f.seek(HEADER + k * STRIDE_A + 8)
            out.append(struct.unpack("<Q", f.read(8))[0])
        return out


def test_leftover_tmp_files_are_removed_once_the_checks_passed(golden, tmp_path, servers):
    ov = _copy(golden, tmp_path)
    (ov / "bitmaps" / "00000003.bitmap.tmp").write_bytes(b"half made")
    srv, control = _serve(servers, ov)
    assert not (ov / "bitmaps" / "00000003.bitmap.tmp").exists()
    assert [b["name"] for b in our_bitmaps(control)] == ["off", "rec"]
    control.close()
