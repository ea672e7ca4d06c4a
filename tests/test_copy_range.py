"""core/fileio.copy_range: file to file in the kernel (copy_file_range), by hand where the
kernel will not; and the copy pipeline sending a file target overlay data that way."""

import errno
import os
import random

import pytest

from plugin.core import fileio

MiB = 1 << 20


def _files(tmp_path, size=3 * MiB + 4096):
    data = random.Random(5).randbytes(size)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(data)
    with open(dst, "wb") as f:
        f.truncate(size)
    return data, os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)


@pytest.mark.parametrize("refuse", [None, errno.EXDEV, errno.EINVAL, errno.ENOSYS])
def test_copy_range_copies_to_the_same_offsets_in_the_kernel_or_by_hand(
        tmp_path, monkeypatch, refuse):
    data, src, dst = _files(tmp_path)
    calls = []
    real = os.copy_file_range

    def copy_file_range(*args):
        calls.append(args)
        if refuse is not None:
            raise OSError(refuse, os.strerror(refuse))
        return real(*args)
    monkeypatch.setattr(fileio.os, "copy_file_range", copy_file_range)
    try:
        fileio.copy_range(src, dst, 4096 + 7, 2 * MiB + 100)
        fileio.copy_range(src, dst, 3 * MiB, 4096)
        out = os.pread(dst, len(data), 0)
    finally:
        os.close(src)
        os.close(dst)
    assert calls                                   # the kernel was asked first
    expect = bytearray(len(data))
    expect[4096 + 7:4096 + 7 + 2 * MiB + 100] = data[4096 + 7:4096 + 7 + 2 * MiB + 100]
    expect[3 * MiB:3 * MiB + 4096] = data[3 * MiB:]
    assert out == bytes(expect)


def test_copy_range_past_the_source_end_is_eio_and_other_errors_pass(tmp_path, monkeypatch):
    data, src, dst = _files(tmp_path, MiB)
    try:
        with pytest.raises(OSError) as e:
            fileio.copy_range(src, dst, MiB - 4096, 8192)
        assert e.value.errno == errno.EIO

        def failing(*args):
            raise OSError(errno.ENOSPC, "full")
        monkeypatch.setattr(fileio.os, "copy_file_range", failing)
        with pytest.raises(OSError) as e:
            fileio.copy_range(src, dst, 0, 4096)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(src)
        os.close(dst)


def test_a_mirror_to_a_file_sends_overlay_data_file_to_file(local_disks, tmp_path, monkeypatch):
    """The copy pipeline hands a file target the overlay's data as (data.img, offset,
    length): copy_file_range, no bytes through Python.  What the base holds is read and
    written as before.  The target equals the disk either way."""
    from conftest import make_image
    from plugin.backends.filetarget import FileTarget
    size = 16 * MiB
    base = make_image(tmp_path / "base.img", size, [(0, size)], seed=4)
    target_path = tmp_path / "target.img"
    with open(target_path, "wb") as f:
        f.truncate(size)
    sent = {"copy": 0, "write": 0}
    real_copy, real_write = FileTarget.submit_copy, FileTarget.submit_write

    def submit_copy(self, fd, offset, length, tag):
        sent["copy"] += length
        return real_copy(self, fd, offset, length, tag)

    def submit_write(self, buf, offset, tag):
        sent["write"] += len(buf)
        return real_write(self, buf, offset, tag)
    monkeypatch.setattr(FileTarget, "submit_copy", submit_copy)
    monkeypatch.setattr(FileTarget, "submit_write", submit_write)
    disk = local_disks(base)
    written = random.Random(6).randbytes(4 * MiB)
    disk.disk.write(bytearray(written), 4 * MiB)            # 4 MiB of overlay data
    job = disk.mirror(target_path, granularity=65536)
    disk.wait_event("BLOCK_JOB_READY")
    assert sent["copy"] == 4 * MiB
    assert sent["write"] == size - 4 * MiB                  # the base's part, read
    expected = disk.read()
    job.user_cancel()
    disk.wait_event("JOB_STATUS_CHANGE", id="disk0", status="null")
    assert target_path.read_bytes() == expected
