"""Across hosts: TLS, reconnect-delay, link faults, one-client far sides, hung targets.

Every server is started here (TCP on 127.0.0.1, or inside a network
namespace the test makes) and killed by pid afterwards.
"""

import os
import pathlib
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import Server, sha256_file
from netrig import MiB, Netns, Rig, nbdkit_tcp, psk_file, restart_tcp, x509_dirs
from helpers import Control


# -- TLS ------------------------------------------------------------------------


def mirror_over_tls(servers, tmp_path, connect, **tls):
    """Mirror a disk with data on it to a TLS-only nbdkit (psk= or x509=), complete,
    and check the pivot and the copy."""
    rig = Rig(servers, tmp_path, connect)
    rig.h.pwrite(b"over TLS" * 4096, 5 * MiB)
    target = nbdkit_tcp(servers, "tls-target", ["file", str(rig.target_path)], **tls)
    rig.mirror(target.uri)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    assert rig.qmp.execute("query-block")[0]["active"] == target.uri
    rig.h.flush()
    assert rig.target_bytes() == expected


def test_mirror_over_tls_psk_to_nbdkit_with_tls_required(servers, tmp_path, connect):
    mirror_over_tls(servers, tmp_path, connect, psk=psk_file(tmp_path))


def test_mirror_over_tls_with_x509_certificates(servers, tmp_path, connect):
    mirror_over_tls(servers, tmp_path, connect, x509=x509_dirs(tmp_path))


def test_stream_from_a_tls_base(servers, tmp_path, connect):
    psk = psk_file(tmp_path)
    base_img = tmp_path / "tls-base.img"
    from conftest import make_image
    make_image(base_img, 8 * MiB, [(0, MiB), (3 * MiB, 2 * MiB)], seed=5)
    base = nbdkit_tcp(servers, "tls-base", ["--readonly", "file", str(base_img)], psk=psk)
    ctl = tmp_path / "ctl.sock"
    disk = servers.overlay(tmp_path / "ov", base=base.uri, size="8M", control=str(ctl))
    h = connect(disk.uri)
    h.pwrite(b"mine" * 1024, 4 * MiB)
    qmp = Control(ctl)
    qmp("block-stream", device="disk0")
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"]
    assert qmp.execute("query-block")[0]["base"] is None
    expected = bytearray(base_img.read_bytes())
    expected[4 * MiB:4 * MiB + 4096] = b"mine" * 1024
    base.kill9()                      # streamed: the base is not needed any more
    assert bytes(h.pread(8 * MiB, 0)) == bytes(expected)
    qmp.close()


def test_plain_uri_to_a_tls_only_server_fails_clearly_before_any_job(servers, tmp_path,
                                                                     connect):
    psk = psk_file(tmp_path)
    rig = Rig(servers, tmp_path, connect)
    target = nbdkit_tcp(servers, "tls-target", ["file", str(rig.target_path)], psk=psk)
    plain = "nbd://127.0.0.1:%d/" % target.port
    with pytest.raises(Exception) as err:
        rig.mirror(plain)
    text = str(err.value)
    assert "requires TLS" in text and "nbds://" in text and plain in text
    assert rig.qmp.execute("query-block-jobs") == []
    assert not [e for e in rig.qmp.drain() if e["event"] == "JOB_STATUS_CHANGE"]


def test_errors_name_the_uri_without_its_password(servers, tmp_path, connect):
    rig = Rig(servers, tmp_path, connect)
    uri = "nbds://alice:s3cret-pw@127.0.0.1:%d/?tls-psk-file=%s" % (
        __import__("netrig").free_port(), tmp_path / "keys.psk")
    with pytest.raises(Exception) as err:
        rig.mirror(uri)
    assert "s3cret-pw" not in str(err.value)
    assert "nbds://alice@127.0.0.1" in str(err.value)
    assert "s3cret-pw" not in rig.disk.log()


def test_qemu_img_reads_and_writes_the_disk_served_with_nbdkit_tls_psk(servers, tmp_path,
                                                                       connect):
    """nbdkit's own --tls=require in front of the plugin; QEMU attaches with tls-creds-psk."""
    from conftest import PLUGIN, make_image
    psk = psk_file(tmp_path)
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, 4 * MiB)], seed=3)
    port = __import__("netrig").free_port()
    server = nbdkit_tcp(servers, "tls-disk", ["python", str(PLUGIN),
                                              "overlay=%s" % (tmp_path / "ov"), "base=" + base],
                        port=port, psk=psk)
    creds = ["--object", "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=alice" % tmp_path]
    # QEMU looks for keys.psk in dir=.
    image = "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,tls-creds=tls0" \
        % port
    info = subprocess.run(["qemu-img", "info", *creds, "--image-opts", image],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "4 MiB" in info.stdout
    out = tmp_path / "copy.raw"
    conv = subprocess.run(["qemu-img", "convert", *creds, "--image-opts", image, "-O", "raw",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert conv.returncode == 0, conv.stderr
    assert sha256_file(out) == sha256_file(base)
    # Without the credentials the server refuses.
    plain = subprocess.run(["qemu-img", "info", "nbd://127.0.0.1:%d" % port],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    assert server.proc.poll() is None


# -- the control socket ---------------------------------------------------------


def test_another_uid_cannot_negotiate_even_with_mode_0666(servers, tmp_path, connect):
    if os.geteuid() != 0:
        pytest.skip("setpriv to another uid needs root")
    folder = pathlib.Path(tempfile.mkdtemp(prefix="ovctl-"))
    try:
        folder.chmod(0o755)
        ctl = folder / "ctl.sock"
        disk = servers.overlay(tmp_path / "ov", size="1M", control=str(ctl))
        ctl.chmod(0o666)
        probe = ("import socket, json\n"
                 "s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(%r)\n"
                 "try:\n"
                 "    s.sendall(json.dumps({'execute': 'qmp_capabilities'}).encode())\n"
                 "    print(repr(s.recv(4096)))\n"
                 "except (ConnectionResetError, BrokenPipeError):\n"
                 "    print(repr(b''))\n" % str(ctl))
        other = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                "--clear-groups", "/usr/bin/python3", "-c", probe],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() == "b''"            # closed, no greeting
        assert "QMP client refused: uid %d" % 65534 in disk.log()
        # The owner (root here) still gets one.
        mine = subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True,
                              text=True, timeout=30)
        assert '"QMP"' in mine.stdout
        qmp = Control(ctl)
        assert qmp.execute("query-block-jobs") == []
        qmp.close()
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


# -- reconnect-delay: a killed or restarted target --------------------------------


def _busy_mirror(rig, target, **args):
    """A mirror slow enough that the faults below happen mid-copy."""
    rig.mirror(target.uri, speed=4 * MiB, **args)
    rig.wait_progress(at_least=MiB)


def _finish_and_compare(rig, expected, timeout=90):
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=timeout)
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=timeout)
    assert "error" not in done["data"], done
    rig.h.flush()
    assert rig.target_bytes() == expected


def test_target_killed_and_restarted_within_reconnect_delay_is_invisible(servers, tmp_path,
                                                                         connect):
    rig = Rig(servers, tmp_path, connect)
    expected = rig.disk_bytes()
    target = nbdkit_tcp(servers, "target", ["file", str(rig.target_path)])
    _busy_mirror(rig, target, on_target_error="report", reconnect_delay=20)
    target.kill9()
    restart_tcp(servers, target)
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    _finish_and_compare(rig, expected)
    assert rig.errors() == []
    assert "Mirror target reconnected" in rig.disk.log()


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_without_reconnect_delay_the_policy_applies(servers, tmp_path, connect, policy):
    rig = Rig(servers, tmp_path, connect)
    expected = rig.disk_bytes()
    target = nbdkit_tcp(servers, "target", ["file", str(rig.target_path)])
    _busy_mirror(rig, target, on_target_error=policy, reconnect_delay=0)
    target.kill9()
    error = rig.qmp.wait_event("BLOCK_JOB_ERROR")
    assert error["data"]["operation"] == "write"
    assert error["data"]["action"] == policy
    if policy == "report":
        done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED")
        assert "error" in done["data"]
        assert rig.qmp.execute("query-block")[0]["active"] is None
        return
    if policy == "stop":
        rig.qmp.wait_status("disk0", "paused")
    restart_tcp(servers, target)
    if policy == "stop":
        rig.qmp("block-job-resume", device="disk0")
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    _finish_and_compare(rig, expected)


def test_sigtermed_target_restarted_a_stop_paused_job_resumes_on_the_new_server(
        servers, tmp_path, connect):
    """nbdkit on SIGTERM answers ESHUTDOWN and keeps the connection open: the job
    must hang up (so the old server can exit) and resume on a new connection."""
    rig = Rig(servers, tmp_path, connect)
    expected = rig.disk_bytes()
    target = nbdkit_tcp(servers, "target", ["file", str(rig.target_path)])
    _busy_mirror(rig, target, on_target_error="stop")
    target.proc.send_signal(signal.SIGTERM)
    error = rig.qmp.wait_event("BLOCK_JOB_ERROR")
    assert error["data"]["action"] == "stop"
    rig.qmp.wait_status("disk0", "paused")
    target.proc.wait(30)             # it exits once we hung up
    restart_tcp(servers, target)
    rig.qmp("block-job-resume", device="disk0")
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    _finish_and_compare(rig, expected)


# -- a link that goes down: a target in another network namespace -------------------


@pytest.fixture
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    ns = Netns()
    yield ns
    ns.delete()


def test_link_down_for_3_s_mid_mirror_is_invisible(servers, tmp_path, connect, netns):
    rig = Rig(servers, tmp_path, connect)
    expected = rig.disk_bytes()
    target = nbdkit_tcp(servers, "far", ["file", str(rig.target_path)], addr=netns.there,
                        prefix=netns.exec_prefix)
    _busy_mirror(rig, target, on_target_error="report", reconnect_delay=10)
    netns.link_down()
    time.sleep(3)                    # the outage itself, not a wait for a result
    netns.link_up()
    rig.qmp("block-job-set-speed", device="disk0", speed=0)
    _finish_and_compare(rig, expected)
    assert rig.errors() == []


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_forced_cancel_during_a_link_stall_is_prompt_and_the_disk_keeps_serving(
        servers, tmp_path, connect, netns, copy_mode):
    rig = Rig(servers, tmp_path, connect)
    target = nbdkit_tcp(servers, "far", ["file", str(rig.target_path)], addr=netns.there,
                        prefix=netns.exec_prefix)
    _busy_mirror(rig, target, copy_mode=copy_mode, reconnect_delay=30)
    rig.h.pwrite(b"before" * 1000, 10 * MiB)        # write-blocking: the through link is up
    netns.link_down()
    try:
        client = connect(rig.disk.uri)
        t0 = time.monotonic()
        client.pwrite(b"during the stall" * 256, 2 * MiB)       # served throughout
        assert bytes(client.pread(16, 2 * MiB)) == b"during the stall"
        rig.qmp("block-job-cancel", device="disk0", force=True)
        rig.qmp.wait_event("BLOCK_JOB_CANCELLED", timeout=30)
        assert time.monotonic() - t0 < 5 + 2.5
        rig.qmp.wait_status("disk0", "null", timeout=5)
        client.pwrite(b"after cancel", 3 * MiB)
        client.flush()
        assert bytes(rig.h.pread(12, 3 * MiB)) == b"after cancel"
        assert rig.errors() == []        # a stall within reconnect-delay is no error
    finally:
        netns.link_up()


# -- stopped targets ------------------------------------------------------------------


def _stopped(server):
    os.kill(server.pid, signal.SIGSTOP)


def _continued(server):
    os.kill(server.pid, signal.SIGCONT)


def test_mirror_to_a_stopped_target_does_not_block_other_control_clients(servers, tmp_path,
                                                                         connect):
    rig = Rig(servers, tmp_path, connect)
    target = servers.nbdkit("file", str(rig.target_path))
    _stopped(target)
    try:
        replied = threading.Event()

        def start():
            # A session of its own: the legacy QMP client runs the calling
            # thread's event loop, and rig.qmp's is the main thread's, which
            # `other` below runs at the same time.
            own = Control(rig.ctl_path)
            try:
                own("drive-mirror", device="disk0", target=target.uri, sync="full")
            finally:
                replied.set()
                own.close()

        starter = threading.Thread(target=start)
        starter.start()
        other = Control(rig.ctl_path)
        t0 = time.monotonic()
        jobs = other.execute("query-block-jobs")
        assert time.monotonic() - t0 < 3
        assert jobs == [] or jobs[0]["device"] == "disk0"
        assert replied.wait(5)
        starter.join()
        assert rig.qmp.job("disk0") is not None          # the job waits for the connection
        other.close()
    finally:
        _continued(target)
    rig.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
    rig.qmp("block-job-cancel", device="disk0")
    rig.qmp.wait_event("BLOCK_JOB_COMPLETED")


def test_write_blocking_with_a_stopped_target_client_writes_fall_back_within_the_bound(
        servers, tmp_path, connect):
    from plugin.blockcopy.writeblocking import THROUGH_TIMEOUT
    rig = Rig(servers, tmp_path, connect)
    target = servers.nbdkit("file", str(rig.target_path))
    rig.mirror(target.uri, copy_mode="write-blocking")
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.h.pwrite(b"through" * 100, MiB)                  # the write-through connection opens
    _stopped(target)
    try:
        for i in range(4):
            t0 = time.monotonic()
            rig.h.pwrite(bytes([i + 1]) * 65536, 4 * MiB + i * 65536)
            assert time.monotonic() - t0 < THROUGH_TIMEOUT + 2
    finally:
        _continued(target)
    expected = rig.disk_bytes()
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"]
    rig.h.flush()
    assert rig.target_bytes() == expected
    assert rig.errors() == []


def test_complete_onto_a_target_that_stops_answering_fails_in_bounded_time(servers, tmp_path,
                                                                           connect):
    from plugin.jobs.mirror import FINAL_SYNC_TIMEOUT
    rig = Rig(servers, tmp_path, connect)
    target = servers.nbdkit("file", str(rig.target_path))
    rig.mirror(target.uri)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.h.pwrite(b"unflushed" * 1000, 6 * MiB)
    _stopped(target)
    try:
        t0 = time.monotonic()
        rig.qmp("block-job-complete", device="disk0")
        error = rig.qmp.wait_event("BLOCK_JOB_ERROR", timeout=FINAL_SYNC_TIMEOUT + 30)
        assert error["data"]["action"] == "report"
        done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" in done["data"]
        assert time.monotonic() - t0 < FINAL_SYNC_TIMEOUT + 15
        assert rig.qmp.execute("query-block")[0]["active"] is None      # no pivot
        assert bytes(rig.h.pread(9, 6 * MiB)) == b"unflushed"
    finally:
        _continued(target)


# -- one-client far sides: qemu-nbd, qemu-storage-daemon ------------------------------------


def test_complete_onto_qemu_nbd_with_its_default_single_client(servers, tmp_path, connect):
    rig = Rig(servers, tmp_path, connect)
    sock = tmp_path / "qemu-nbd.sock"
    # Defaults: --shared=1, and without --persistent it exits after its one client.
    qemu_nbd = Server(["qemu-nbd", "-k", str(sock), "-f", "raw", "--cache=none",
                       str(rig.target_path)], sock, tmp_path / "qemu-nbd.log")
    servers.started.append(qemu_nbd)
    qemu_nbd.wait_ready()
    rig.h.pwrite(b"to qemu-nbd" * 1000, 7 * MiB)
    uri = "nbd+unix:///?socket=%s" % sock
    rig.mirror(uri)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"]
    assert rig.qmp.execute("query-block")[0]["active"] == uri
    rig.h.pwrite(b"after pivot", 9 * MiB)              # served through the handed-over link
    rig.h.flush()
    expected = rig.disk_bytes()
    rig.qmp.close()
    rig.h.shutdown()
    assert rig.disk.stop() == 0
    qemu_nbd.proc.wait(30)                             # its one client went away
    assert rig.target_bytes() == expected


def test_complete_onto_a_qemu_storage_daemon_nbd_export(servers, tmp_path, connect):
    rig = Rig(servers, tmp_path, connect)
    sock = tmp_path / "qsd.sock"
    qsd = Server(["qemu-storage-daemon",
                  "--blockdev", "driver=file,node-name=file0,filename=%s" % rig.target_path,
                  "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                  "--export", "type=nbd,id=exp0,node-name=file0,name=far,writable=on"],
                 sock, tmp_path / "qsd.log")
    servers.started.append(qsd)
    qsd.wait_ready()
    uri = "nbd+unix:///far?socket=%s" % sock
    rig.h.pwrite(b"to qsd" * 1000, 7 * MiB)
    rig.mirror(uri)
    rig.qmp.wait_event("BLOCK_JOB_READY")
    rig.qmp("block-job-complete", device="disk0")
    done = rig.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
    assert "error" not in done["data"]
    rig.h.pwrite(b"after pivot", 9 * MiB)
    rig.h.flush()
    expected = rig.disk_bytes()
    rig.qmp.close()
    rig.h.shutdown()
    assert rig.disk.stop() == 0
    assert rig.target_bytes() == expected


# -- the base over the network: reconnect-delay plugin key -------------------------------


def test_base_restarted_within_reconnect_delay_reads_wait_and_succeed(servers, tmp_path,
                                                                      connect):
    from conftest import make_image
    base_img = tmp_path / "net-base.img"
    make_image(base_img, 4 * MiB, [(0, 4 * MiB)], seed=9)
    base = nbdkit_tcp(servers, "base", ["--readonly", "file", str(base_img)])
    disk = servers.overlay(tmp_path / "ov", base=base.uri, size="4M", reconnect_delay="20")
    h = connect(disk.uri)
    assert bytes(h.pread(MiB, 0)) == base_img.read_bytes()[:MiB]
    base.kill9()
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("data", bytes(h.pread(MiB, MiB))))
    reader.start()
    restart_tcp(servers, base)
    reader.join(60)
    assert got["data"] == base_img.read_bytes()[MiB:2 * MiB]
    assert "NBD connection lost" in disk.log()


def test_base_gone_without_reconnect_delay_fails_the_read(servers, tmp_path, connect):
    from conftest import make_image
    base_img = tmp_path / "net-base.img"
    make_image(base_img, 4 * MiB, [(0, 4 * MiB)], seed=9)
    base = nbdkit_tcp(servers, "base", ["--readonly", "file", str(base_img)])
    disk = servers.overlay(tmp_path / "ov", base=base.uri, size="4M")
    h = connect(disk.uri)
    assert bytes(h.pread(4096, 0)) == base_img.read_bytes()[:4096]
    base.kill9()
    import nbd
    with pytest.raises(nbd.Error):
        h.pread(4096, MiB)
    assert disk.proc.poll() is None


def test_redact_drops_only_the_password():
    from plugin.backends.nbdconnect import redact
    assert redact("nbds://alice:pw@host:10809/x?tls-psk-file=/k") == \
        "nbds://alice@host:10809/x?tls-psk-file=/k"
    assert redact("nbds://alice@host/?tls-psk-file=/k") == "nbds://alice@host/?tls-psk-file=/k"
    assert redact("nbd+unix:///?socket=/a@b:c") == "nbd+unix:///?socket=/a@b:c"
    assert redact("/plain/file.img") == "/plain/file.img"
