"""Dirty bitmaps on a full filesystem: what needs new space fails with ENOSPC and changes
nothing; everything else (merge, clear, enable, disable, remove, writes, flush, the
saves at checkpoints and at stop) needs none and works; nothing is damaged.

The state directory lives on a 4 MiB tmpfs (mounted by the test as root, as
test_guest_io_errors.py does), so it outlives the server for the restart.
"""

import os

import nbd
import pytest

from bitmap_rig import MiB, answer, covers, extents, our_bitmaps
from conftest import small_tmpfs
from helpers import Control

NOSPACE = ("error", "GenericError",
           "Dirty bitmaps not changed: No space left on device (ENOSPC)")


@pytest.fixture
def small_fs(tmp_path):
    yield from small_tmpfs(tmp_path / "small", "4M")


def _fill(h):
    """Write until the filesystem is full to the last page."""
    offset = 8 * MiB
    for size in (MiB, 4096):
        while True:
            try:
                h.pwrite(b"F" * size, offset)
            except nbd.Error as e:
                assert e.errno == "ENOSPC"
                break
            offset += size
    return offset


def _state(ov):
    return {name: os.path.getsize(ov / "bitmaps" / name)
            for name in sorted(os.listdir(ov / "bitmaps"))}


def test_a_full_filesystem_fails_only_what_needs_space(servers, tmp_path, small_fs):
    ov = small_fs / "ov"
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(ov, size="64M", control=str(ctl))
    control = Control(ctl)
    control("block-dirty-bitmap-add", node="disk0", name="a", persistent=True)
    control("block-dirty-bitmap-add", node="disk0", name="b", persistent=True,
            granularity=MiB)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"x" * 65536, 0)
    end = _fill(h)
    files = _state(ov)
    before = our_bitmaps(control)
    # What needs a new file fails with ENOSPC and changes nothing.
    assert answer(control, "block-dirty-bitmap-add", node="disk0", name="c",
                  persistent=True) == NOSPACE
    assert answer(control, "transaction", actions=[
        {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "a"}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "d", "persistent": True}}]) == NOSPACE
    assert our_bitmaps(control) == before
    assert _state(ov) == files
    # The rest needs no space.
    control("block-dirty-bitmap-add", node="disk0", name="mem")
    control("block-dirty-bitmap-merge", node="disk0", target="b", bitmaps=["a"])
    control("block-dirty-bitmap-disable", node="disk0", name="a")
    control("block-dirty-bitmap-enable", node="disk0", name="a")
    control("block-dirty-bitmap-clear", node="disk0", name="a")
    h.pwrite(b"y" * 4096, 8 * MiB + 4096)   # allocated already: no new space
    h.zero(65536, 2 * MiB)                  # a whole cluster: metadata only
    h.flush()
    control("block-dirty-bitmap-clear", node="disk0", name="mem")
    want = {name: extents(control, name) for name in ("a", "b")}
    assert want["a"] == [(2 * MiB, 65536), (8 * MiB, 65536)]
    assert covers(want["b"], 0, 65536) and covers(want["b"], 8 * MiB, end - 8 * MiB)
    assert not covers(want["b"], end + MiB, MiB)
    assert _state(ov) == files
    h.shutdown()
    control.close()
    assert srv.stop() == 0                   # the final save needs no space either
    srv = servers.restart(srv)
    control = Control(ctl)
    assert {name: extents(control, name) for name in ("a", "b")} == want
    assert [b["name"] for b in our_bitmaps(control)] == ["b", "a"]
    control("block-dirty-bitmap-remove", node="disk0", name="b")
    assert sorted(_state(ov)) == ["00000001.bitmap", "regions"]
    control.close()


def test_the_first_persistent_bitmap_on_a_full_filesystem_leaves_nothing(servers, tmp_path,
                                                                        small_fs):
    ov = small_fs / "ov"
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(ov, size="64M", control=str(ctl))
    control = Control(ctl)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    _fill(h)
    assert answer(control, "block-dirty-bitmap-add", node="disk0", name="p",
                  persistent=True) == NOSPACE
    assert not (ov / "bitmaps").exists()
    assert our_bitmaps(control) == []
    h.shutdown()
    control.close()
    assert srv.stop() == 0


def test_a_write_held_by_werror_stop_is_marked_again_when_it_is_retried(servers, tmp_path,
                                                                        small_fs):
    """A write fails for want of space and is held (werror=stop); meanwhile the bitmap is
    cleared; cont retries it once space is back: the bitmap must hold it."""
    import threading
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"b" * MiB)
    ov = small_fs / "ov"
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(ov, size="64M", control=str(ctl), werror="stop")
    control = Control(ctl)
    control("block-dirty-bitmap-add", node="disk0", name="a", persistent=True)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    offset = 0
    done = threading.Event()

    def writer():
        nonlocal offset
        while not done.is_set():
            h.pwrite(b"w" * MiB, offset)       # held once the filesystem is full
            offset += MiB
    thread = threading.Thread(target=writer)
    thread.start()
    control.wait_event("BLOCK_IO_ERROR", timeout=30, action="stop")
    held = offset
    control("block-dirty-bitmap-clear", node="disk0", name="a")
    assert extents(control, "a") == []
    done.set()
    ballast.unlink()
    control("cont")
    thread.join(30)
    assert not thread.is_alive()
    assert extents(control, "a") == [(held, MiB)]
    h.shutdown()
    control.close()
