"""Guest-facing errors (SPEC section 5): werror/rerror, BLOCK_IO_ERROR, stop/cont."""

import subprocess
import threading

import nbd

from conftest import make_image
from helpers import Control

MiB = 1 << 20


def fill_until_enospc(h, start=0):
    """Write 1 MiB blocks until the overlay's filesystem is full; return the failing offset."""
    for i in range(start, 64):
        try:
            h.pwrite(b"F" * MiB, i * MiB)
        except nbd.Error as e:
            assert e.errno == "ENOSPC"
            return i * MiB
    raise AssertionError("the overlay never ran out of space")


def test_default_werror_report_gives_enospc_and_an_event(servers, tmp_path, small_fs, connect):
    srv = servers.overlay(small_fs / "ov", size="64M", control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    fill_until_enospc(connect(srv.uri))
    e = qmp.wait_event("BLOCK_IO_ERROR", timeout=10)
    assert e["data"] == {"device": "disk0", "node-name": "disk0", "operation": "write",
                         "action": "report", "nospace": True,
                         "reason": "No space left on device"}
    assert qmp.execute("query-block")[0]["io-status"] == "ok"
    qmp.close()


def test_werror_stop_holds_the_write_until_cont_and_loses_nothing(servers, tmp_path, small_fs,
                                                                  connect):
    srv = servers.overlay(small_fs / "ov", size="64M", werror="stop",
                          control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    h = connect(srv.uri)
    result = {}

    def writer():
        try:
            for i in range(8):                      # 8 MiB: does not fit in 2 MiB
                h.pwrite(bytes([i + 1]) * MiB, i * MiB)
            h.flush()
            result["ok"] = True
        except nbd.Error as e:
            result["error"] = e

    t = threading.Thread(target=writer)
    t.start()
    e = qmp.wait_event("BLOCK_IO_ERROR", timeout=30)
    assert e["data"]["action"] == "stop" and e["data"]["nospace"] is True
    assert qmp.execute("query-block")[0]["io-status"] == "nospace"
    t.join(1.0)
    assert t.is_alive()                             # held, not failed
    reader = connect(srv.uri)
    assert reader.pread(4, 0) == b"\x01" * 4        # the disk keeps serving reads
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_fs)], check=True)
    qmp("cont")
    t.join(30)
    assert result == {"ok": True}
    assert qmp.execute("query-block")[0]["io-status"] == "ok"
    for i in range(8):
        assert reader.pread(MiB, i * MiB) == bytes([i + 1]) * MiB
    qmp.close()


def test_rerror_stop_holds_a_failing_base_read_until_cont(servers, tmp_path, connect):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, 4 * MiB)], seed=5)
    fault = tmp_path / "fault"
    base_srv = servers.nbdkit("file", base, "error=EIO", "error-pread-rate=100%",
                              "error-file=%s" % fault, filters=["error"])
    srv = servers.overlay(tmp_path / "ov", base=base_srv.uri, rerror="stop",
                          control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    h = connect(srv.uri)
    fault.touch()
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("data", h.pread(MiB, MiB)))
    t.start()
    e = qmp.wait_event("BLOCK_IO_ERROR", timeout=30)
    assert e["data"]["operation"] == "read" and e["data"]["action"] == "stop"
    assert e["data"]["nospace"] is False
    assert qmp.execute("query-block")[0]["io-status"] == "failed"
    fault.unlink()
    qmp("cont")
    t.join(30)
    assert got["data"] == open(base, "rb").read()[MiB:2 * MiB]
    qmp.close()


def test_stop_holds_client_requests_until_cont(servers, tmp_path, connect):
    srv = servers.overlay(tmp_path / "ov", size="4M", control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    h = connect(srv.uri)
    qmp("stop")
    assert qmp.execute("query-status") == {"running": False, "status": "paused"}
    done = threading.Event()
    t = threading.Thread(target=lambda: (h.pwrite(b"held", 0), done.set()))
    t.start()
    assert not done.wait(1.0)
    qmp("cont")
    assert done.wait(10)
    t.join()
    assert qmp.execute("query-status")["running"] is True
    assert h.pread(4, 0) == b"held"
    qmp.close()
