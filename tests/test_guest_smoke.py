"""The test guest (scripts/guest, tests/guest.py): it boots, writes and reads an NBD disk,
and the host-side check sees exactly what it wrote.

The guest tests boot QEMU under TCG (a few seconds each) against `nbdkit memory`; the
helper's pure functions are tested without a guest.
"""

import hashlib
import os
import subprocess

import nbd
import pytest

import guest

DISK = 64 * 1024 * 1024


@pytest.fixture
def disk(servers):
    """A blank 64 MiB disk served by nbdkit's memory plugin."""
    return servers.nbdkit("memory", "64M")


def run(disk, tmp_path, guest_image, mode_args, **kwargs):
    return guest.run_guest(disk.sock, mode_args, image=guest_image,
                           log_path=tmp_path / "guest.log", **kwargs)


# --- with a guest ---------------------------------------------------------------------------

@pytest.mark.guest
@pytest.mark.slow
def test_writeread_writes_are_on_the_disk(disk, tmp_path, guest_image):
    result = run(disk, tmp_path, guest_image, {"mode": "writeread", "seed": 7, "count": 16})
    result.raise_if_failed()
    assert len(result.writes) == 16
    assert guest.check_writes(result, disk.uri) == []


@pytest.mark.guest
@pytest.mark.slow
def test_writeread_summary_hash_is_the_hash_of_the_expected_blocks(disk, tmp_path, guest_image):
    result = run(disk, tmp_path, guest_image,
                 {"mode": "writeread", "seed": "s1", "count": 4, "bs": 8192, "start": 100})
    result.raise_if_failed()
    expected = b"".join(guest.expected_block("s1", seq, 8192) for seq in range(100, 104))
    assert result.sha256 == hashlib.sha256(expected).hexdigest()


@pytest.mark.guest
@pytest.mark.slow
def test_corrupted_block_fails_the_check(disk, tmp_path, guest_image):
    result = run(disk, tmp_path, guest_image, {"mode": "writeread", "seed": 3, "count": 8})
    result.raise_if_failed()
    victim = result.writes[5]
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(b"\xff" * 512, victim.offset + 1024)
    h.shutdown()

    mismatches = guest.check_writes(result, disk.uri)

    assert [(m.seq, m.problem) for m in mismatches] == [(victim.seq, "disk")]
    assert "first_bad_offset=%d" % (victim.offset + 1024) in mismatches[0].detail


@pytest.mark.guest
@pytest.mark.slow
def test_writeloop_runs_in_the_background_and_its_writes_are_on_the_disk(disk, tmp_path,
                                                                       guest_image):
    with guest.start_guest(disk.sock, {"mode": "writeloop", "seed": 9, "seconds": 3},
                           image=guest_image, log_path=tmp_path / "guest.log") as g:
        early = g.wait_for_writes(5, timeout=60)
        result = g.wait()
    result.raise_if_failed()
    assert len(result.writes) > len(early)
    assert guest.check_writes(result, disk.uri) == []


@pytest.mark.guest
@pytest.mark.slow
def test_verify_mode_finds_the_blocks_an_earlier_guest_wrote(disk, tmp_path, guest_image):
    run(disk, tmp_path, guest_image, {"mode": "writeread", "seed": 5, "count": 6}).raise_if_failed()
    result = guest.run_guest(disk.sock, {"mode": "verify", "seed": 5, "count": 6},
                             image=guest_image, log_path=tmp_path / "verify.log")
    result.raise_if_failed()
    assert [v.ok for v in result.verifies] == [True] * 6


@pytest.mark.guest
@pytest.mark.slow
def test_read_mode_checksums_match_the_host(disk, tmp_path, guest_image):
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(bytes(range(256)) * 256, 1 << 20)
    h.shutdown()
    result = run(disk, tmp_path, guest_image,
                 {"mode": "read", "ranges": [(1 << 20, 65536), (0, 4096), (DISK - 512, 512)]})
    result.raise_if_failed()
    assert len(result.reads) == 3
    assert guest.check_reads(result, disk.uri) == []


@pytest.mark.guest
def test_guest_past_its_timeout_is_killed(disk, tmp_path, guest_image):
    result = run(disk, tmp_path, guest_image, {"mode": "writeloop", "seconds": 600}, timeout=1)
    assert result.status == "timeout"
    assert result.returncode is not None


@pytest.mark.guest
def test_guest_without_server_reports_no_result(tmp_path, guest_image):
    result = guest.run_guest(tmp_path / "missing.sock", {"mode": "writeread"}, image=guest_image,
                             log_path=tmp_path / "guest.log", timeout=60)
    assert result.status == "no-result"
    with pytest.raises(guest.GuestFailed):
        result.raise_if_failed()


# --- the helper's pure functions ------------------------------------------------------------

def test_expected_block_is_64_byte_lines_keyed_by_seed_and_seq():
    block = guest.expected_block(7, 3, 4096)
    lines = block.splitlines(keepends=True)
    assert len(block) == 4096 and len(lines) == 64
    assert all(len(line) == 64 for line in lines)
    assert lines[2] == b"%s %011d %010d\n" % (guest.block_key(7, 3)[:40].encode(), 3, 2)
    assert guest.expected_block(7, 4, 4096) != block
    assert guest.expected_block(8, 3, 4096) != block


def test_expected_offsets_are_a_permutation_of_the_slots():
    slots = 64 * 1024 * 1024 // 4096
    offsets = {guest.expected_offset("x", seq, 64 * 1024 * 1024, 4096) for seq in range(slots)}
    assert offsets == {slot * 4096 for slot in range(slots)}


def test_expected_offsets_are_a_permutation_when_slots_are_not_a_power_of_two():
    disk_bytes = 1000 * 512
    offsets = {guest.expected_offset(2, seq, disk_bytes, 512) for seq in range(1000)}
    assert offsets == {slot * 512 for slot in range(1000)}


def test_guest_args_accept_short_names_and_ranges():
    args = guest.guest_args({"mode": "read", "granges": [(0, 512), (4096, 1024)]})
    assert args == {"gmode": "read", "granges": "0:512,4096:1024"}
    assert guest.guest_args("gmode=writeread gseed=4") == {"gmode": "writeread", "gseed": "4"}


def test_guest_args_reject_unsafe_values():
    with pytest.raises(ValueError):
        guest.guest_args({"mode": "writeread", "seed": "a b"})


def test_parse_log_reads_lines_behind_terminal_noise():
    text = ("\x1bc\x1b[2JGUEST-START mode=writeread seed=7 bs=4096 disk_bytes=65536\r\n"
            "[    1.0] some kernel line\r\n"
            "GUEST-WRITE seq=0 offset=8192 length=4096 sha256=ab\r\n"
            "GUEST-RESULT fail reason=readback-mismatch seq=0 offset=8192\r\n")
    report = guest.parse_log(text)
    assert report.start["disk_bytes"] == "65536"
    assert report.writes == [guest.GuestWrite(0, 8192, 4096, "ab")]
    assert (report.outcome, report.reason) == ("fail", "readback-mismatch seq=0 offset=8192")


def test_check_writes_against_an_image_file(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(65536))
    block = guest.expected_block(1, 0, 4096)
    offset = guest.expected_offset(1, 0, 65536, 4096)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(block)
    write = guest.GuestWrite(0, offset, 4096, hashlib.sha256(block).hexdigest())
    result = guest.GuestResult("ok", {"gseed": "1"},
                               guest.GuestReport(start={"seed": "1", "disk_bytes": "65536"},
                                                 writes=[write]),
                               0, 0.0, tmp_path / "none.log")
    assert guest.check_writes(result, image) == []


# --- the build script -------------------------------------------------------------------------

@pytest.mark.guest
def test_build_is_a_no_op_when_cached(guest_image):
    before = guest_image.initrd.stat().st_mtime_ns
    out = subprocess.run([str(guest.BUILD_SCRIPT)], capture_output=True, text=True, check=True,
                         env={**os.environ, "GUEST_DIR": str(guest_image.kernel.parent)})
    assert "INITRD=%s" % guest_image.initrd in out.stdout
    assert guest_image.initrd.stat().st_mtime_ns == before


def test_build_without_the_kernel_package_exits_unavailable(tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("apt-get", "apt-cache"):
        (stubs / tool).write_text("#!/bin/sh\nexit 100\n")
        (stubs / tool).chmod(0o755)
    env = {**os.environ, "GUEST_DIR": str(tmp_path / "guest"),
           "PATH": "%s:%s" % (stubs, os.environ["PATH"])}
    proc = subprocess.run([str(guest.BUILD_SCRIPT)], capture_output=True, text=True, env=env)
    assert proc.returncode == guest.EXIT_UNAVAILABLE
    assert "UNAVAILABLE" in proc.stderr
