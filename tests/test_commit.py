"""block-commit against real servers: the overlay written back into its base while a
client writes, complete empties the overlay, cancel leaves it whole, refusals come
before any job exists (QEMU's texts, as qemu-storage-daemon 7.2 gives them)."""

import os
import subprocess

import pytest

from commit_rig import CS, CommitRig, Control, MiB, Writer, qemu_nbd
from conftest import make_image
from faults import wait_until

from jobctl.qmp_client import QMPError

@pytest.fixture
def rig_of(servers, tmp_path):
    """CommitRig(servers, tmp_path, ...); its QMP sessions are closed after the test."""
    made = []

    def make(*args, **kwargs):
        made.append(CommitRig(servers, tmp_path, *args, **kwargs))
        return made[-1]

    yield make
    for rig in made:
        rig.qmp.close()


SUCCESS_ORDER = ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running",
                 "JOB_STATUS_CHANGE:ready", "BLOCK_JOB_READY",
                 "JOB_STATUS_CHANGE:waiting", "JOB_STATUS_CHANGE:pending",
                 "BLOCK_JOB_COMPLETED", "JOB_STATUS_CHANGE:concluded", "JOB_STATUS_CHANGE:null"]


@pytest.mark.parametrize("base_kind", ["file", "nbdkit", "qemu-nbd"])
def test_commit_while_a_client_writes_then_the_base_alone_is_the_disk(rig_of, base_kind):
    rig = rig_of(base_kind)
    rig.fill_overlay()
    held = rig.held()
    assert held > 0
    writer = Writer(rig.disk.uri, rig.size, seed=2)
    writer.start()
    rig.commit()
    ready = rig.qmp.wait_event("BLOCK_JOB_READY")["data"]
    assert ready["type"] == "commit" and ready["device"] == "disk0"
    info = rig.qmp.job("disk0")
    assert info["type"] == "commit" and info["ready"] and info["x-policies"] == {
        "on-error": "report"}
    assert set(rig.meta()["base_check"]) == {"size"}     # the job changes the sampled bytes
    assert writer.finish() > 0
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert done["type"] == "commit" and "error" not in done
    rig.qmp.wait_status("disk0", "null")
    assert rig.qmp.names() == SUCCESS_ORDER
    assert rig.base_bytes() == expected                 # the base alone is the disk
    assert rig.disk_bytes() == expected
    alloc = rig.allocation()
    assert alloc["absent-clusters"] == alloc["clusters"]   # the overlay holds nothing
    # ... and its space is released: data.img is a new empty file (the old one is
    # freed by its last close, off the completion's path).
    assert os.stat(rig.overlay_dir / "data.img").st_blocks == 0
    assert not [n for n in os.listdir(rig.overlay_dir) if n.endswith(".new")]
    assert rig.records() == {} and not os.listdir(rig.overlay_dir / "jobs")
    assert rig.meta()["base_check"]["size"] == rig.size
    # The disk goes on over its base: new writes land in the overlay again.
    rig.h.pwrite(b"N" * 4096, 5 * MiB + 512)
    rig.h.flush()
    assert rig.allocation()["data-clusters"] == 1
    expected = rig.disk_bytes()
    base_now = rig.base_bytes()
    rig.stop()
    rig.restart()                                        # the changed base is accepted
    assert rig.disk_bytes() == expected
    assert rig.base_bytes() == base_now
    assert rig.allocation()["data-clusters"] == 1


def test_the_commit_compares_equal_with_qemu_img(rig_of):
    rig = rig_of()
    rig.fill_overlay(seed=9)
    rig.commit()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", rig.base_path,
                        rig.disk.uri], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_file_base_fingerprint_is_recorded_anew(rig_of):
    rig = rig_of()
    before = rig.meta()["base_check"]
    assert set(before) == {"size", "mtime_ns", "sha256"}
    rig.h.pwrite(b"S" * CS, 0)                           # inside the first sample
    rig.h.flush()
    rig.commit()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    after = rig.meta()["base_check"]
    assert set(after) == {"size", "mtime_ns", "sha256"}
    assert after["sha256"] != before["sha256"]


def test_commit_of_an_empty_overlay_is_ready_at_once(rig_of):
    rig = rig_of()
    base = rig.base_bytes()
    rig.commit(job_id="c1")
    rig.qmp.wait_event("BLOCK_JOB_READY", device="c1")
    rig.qmp("job-complete", id="c1")
    rig.qmp.wait_status("c1", "null")
    assert rig.base_bytes() == base == rig.disk_bytes()


def test_cancel_before_ready_leaves_the_overlay_whole(rig_of):
    rig = rig_of()
    rig.fill_overlay()
    before, alloc = rig.disk_bytes(), rig.allocation()
    rig.commit(speed=MiB)
    wait_until(lambda: rig.qmp.job("disk0")["offset"] > 0)
    rig.qmp("block-job-cancel", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_CANCELLED")
    rig.qmp.wait_status("disk0", "null")
    assert rig.allocation() == alloc and rig.disk_bytes() == before
    assert set(rig.meta()["base_check"]) == {"size", "mtime_ns", "sha256"}
    rig.stop()
    rig.restart()                                        # the partly written base is accepted
    assert rig.disk_bytes() == before and rig.allocation() == alloc


def test_soft_cancel_after_ready_completes_and_keeps_the_overlay(rig_of):
    rig = rig_of()
    rig.fill_overlay()
    before, alloc = rig.disk_bytes(), rig.allocation()
    rig.commit()
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.qmp("block-job-cancel", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")["data"]
    assert "error" not in done
    rig.qmp.wait_status("disk0", "null")
    assert rig.allocation() == alloc and rig.disk_bytes() == before
    assert rig.base_bytes() == before                    # in sync when it ended


def test_pause_resume_and_set_speed(rig_of):
    rig = rig_of()
    rig.fill_overlay()
    rig.commit(speed=MiB)
    rig.qmp("block-job-pause", device="disk0")
    rig.qmp.wait_status("disk0", "paused")
    rig.qmp("job-change", id="disk0", on_error="stop")
    assert rig.qmp.job("disk0")["x-policies"] == {"on-error": "stop"}
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    rig.qmp.wait_status("disk0", "null")
    assert rig.base_bytes() == expected


# -- refused before any job exists ------------------------------------------------


def _refused(qmp, text, cls="GenericError", **args):
    """block-commit is refused with QEMU's (class, text), and no job ever existed."""
    args.setdefault("device", "disk0")
    with pytest.raises(QMPError) as e:
        qmp("block-commit", **args)
    assert (e.value.cls, e.value.desc) == (cls, text)
    assert qmp.execute("query-block-jobs") == []
    assert not [n for n in qmp.drain(0.1) if n["event"].startswith(("JOB_", "BLOCK_JOB"))]


def test_a_read_only_nbd_base_is_refused(servers, tmp_path):
    for name, start in (("nbdkit", lambda img: servers.nbdkit("file", img, "-r")),
                        ("qemu-nbd", lambda img: qemu_nbd(servers, img, tmp_path,
                                                          readonly=True))):
        image = make_image(tmp_path / ("%s.img" % name), 4 * MiB, [(0, MiB)])
        base = start(image)
        disk = servers.overlay(tmp_path / ("ov-" + name), base=base.uri,
                               control=str(tmp_path / ("%s.ctl" % name)))
        qmp = Control(tmp_path / ("%s.ctl" % name))
        _refused(qmp, "Block node is read-only")
        qmp.close()
        disk.stop()


@pytest.fixture
def read_only_file():
    """Make a file refuse writes, also to root (immutable), and undo it afterwards."""
    made = []

    def make(path):
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("chattr +i is not supported here")
            made.append(path)
        else:
            os.chmod(path, 0o444)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)])


def test_a_base_file_that_refuses_writes_is_refused(rig_of, read_only_file):
    rig = rig_of(size=4 * MiB)
    read_only_file(rig.base_path)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    _refused(rig.qmp, "Could not reopen file: " + reason)


def test_no_base_is_refused(servers, tmp_path):
    disk = servers.overlay(tmp_path / "ov", size="4M", control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    _refused(qmp, "cannot commit an image into itself")
    qmp.close()
    disk.stop()


def test_arguments_are_checked_as_qemu_checks_them(rig_of):
    rig = rig_of(size=4 * MiB)
    _refused(rig.qmp, "Device 'nope' not found", "DeviceNotFound", device="nope")
    _refused(rig.qmp, "Can't find '/x' in the backing chain", base="/x")
    _refused(rig.qmp, "Top image file /x not found", top="/x")
    _refused(rig.qmp, "'top-node' and 'top' are mutually exclusive", top="disk0",
             top_node="disk0")
    _refused(rig.qmp, "Cannot find device='' nor node-name='n'", top_node="n")
    _refused(rig.qmp, "'base-node' and 'base' are mutually exclusive", base=rig.base,
             base_node="b")
    _refused(rig.qmp, "'b' is not in this backing file chain", base_node="b")
    _refused(rig.qmp, "cannot commit an image into itself", base_node="disk0")
    _refused(rig.qmp, "'backing-file' specified, but 'top' is the active layer", backing_file="x")
    _refused(rig.qmp, "Parameter 'speed' expects a non-negative value", speed=-1)
    # What names the two layers is accepted.
    rig.commit(base=rig.base, top=str(rig.overlay_dir), filter_node_name="f", job_id="ok")
    rig.qmp.wait_event("BLOCK_JOB_READY", device="ok")
    rig.qmp("block-job-cancel", device="ok")
    rig.qmp.wait_status("ok", "null")


def test_a_busy_device_is_refused(rig_of):
    rig = rig_of(size=4 * MiB)
    rig.qmp("block-stream", device="disk0", speed=1)
    _refused_busy = "Node 'disk0' is busy: block device is in use by block job: stream"
    with pytest.raises(QMPError) as e:
        rig.commit()
    assert e.value.desc == _refused_busy
    rig.qmp("block-job-cancel", device="disk0", force=True)
    rig.qmp.wait_status("disk0", "null")


def test_a_base_smaller_than_the_disk_is_refused(servers, tmp_path):
    base = make_image(tmp_path / "small.img", 2 * MiB, [(0, MiB)])
    disk = servers.overlay(tmp_path / "ov", base=base, size="4M",
                           control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    _refused(qmp, "Top image disk0 is larger than base image %s, and resize of base image "
             "is not supported" % base)
    qmp.close()
    disk.stop()
