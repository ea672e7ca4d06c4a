"""`jobctl metrics` against the real plugin in nbdkit: what it prints matches what QMP says.

The exposition is read back with the Prometheus client library's text parser,
as a Prometheus server or node_exporter would read it.
"""

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_image
from helpers import Control
from test_jobctl_real import jobctl_path

MiB = 1 << 20
SIZE = 32 * MiB


def parse(text):
    """{(name, frozenset(labels)): value}; fails on a duplicate series."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key
            out[key] = s.value
    return out


def job_series(parsed, job_id):
    """A job's metrics by sample name, with the labels that tell them apart."""
    out = {}
    for (name, labels), v in parsed.items():
        labels = dict(labels)
        if labels.get("job_id") != job_id:
            continue
        extra = tuple(sorted((k, x) for k, x in labels.items()
                             if k not in ("job_id", "device", "type")))
        out[(name, extra)] = v
    return out


def metrics(ctl):
    out = subprocess.run([jobctl_path(), "--socket", str(ctl), "metrics"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return parse(out.stdout)


def expected_from(info):
    """What job_series must hold for a BlockJobInfo (the fields metrics reports)."""
    want = {("overlay_nbd_job_offset_bytes", ()): info["offset"],
            ("overlay_nbd_job_length_bytes", ()): info["len"],
            ("overlay_nbd_job_copied_bytes_total", ()): info["x-copied-bytes"],
            ("overlay_nbd_job_speed_limit_bytes_per_second", ()): info["speed"],
            ("overlay_nbd_job_status", (("status", info["status"]),)): 1,
            ("overlay_nbd_job_io_status", (("io_status", info["io-status"]),)): 1,
            ("overlay_nbd_job_paused", ()): int(info["paused"]),
            ("overlay_nbd_job_ready", ()): int(info["ready"]),
            ("overlay_nbd_job_busy", ()): int(info["busy"])}
    for count in info.get("x-error-counts", ()):
        want[("overlay_nbd_job_errors_total", (("errno", count["errno"]),
                                               ("operation", count["operation"])))] = count["count"]
    policies = {k.replace("-", "_"): v for k, v in info["x-policies"].items()}
    info_labels = dict(policies, auto_finalize=str(info["auto-finalize"]).lower(),
                       auto_dismiss=str(info["auto-dismiss"]).lower())
    want[("overlay_nbd_job_info", tuple(sorted(info_labels.items())))] = 1
    return want


@pytest.fixture
def disk(servers, tmp_path):
    base = make_image(tmp_path / "base.img", SIZE, [(0, SIZE)], seed=3)
    ctl = tmp_path / "ctl.sock"
    server = servers.overlay(tmp_path / "ov", base=base, control=str(ctl))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    return server, ctl, Control(ctl), target


def test_metrics_match_query_block_jobs_for_a_running_mirror(disk):
    server, ctl, qmp, target = disk
    qmp("drive-mirror", device="disk0", target=str(target), sync="full", job_id="m0",
        speed=2 * MiB, on_target_error="ignore")
    qmp.wait_status("m0", "running")
    before = qmp.job("m0")
    parsed = metrics(ctl)
    after = qmp.job("m0")
    got = job_series(parsed, "m0")
    assert before["status"] == after["status"] == "running"
    # offset, len and copied bytes move while it runs: between the two answers.
    for name, key in (("overlay_nbd_job_offset_bytes", "offset"),
                      ("overlay_nbd_job_length_bytes", "len"),
                      ("overlay_nbd_job_copied_bytes_total", "x-copied-bytes")):
        low, high = sorted((before[key], after[key]))
        assert low <= got.pop((name, ())) <= high, name
    want = expected_from(before)
    for name in ("overlay_nbd_job_offset_bytes", "overlay_nbd_job_length_bytes",
                 "overlay_nbd_job_copied_bytes_total", "overlay_nbd_job_busy"):
        want.pop((name, ()))
    got.pop(("overlay_nbd_job_busy", ()))          # busy flips as the job sleeps for its speed
    want[("overlay_nbd_job_failed", ())] = 0
    assert {k: v for k, v in got.items() if v or k in want} == want
    assert parsed[("overlay_nbd_job_status", frozenset(
        {"job_id": "m0", "device": "disk0", "type": "mirror", "status": "running"}.items()))] == 1
    qmp("block-job-cancel", device="m0", force=True)
    qmp.close()


def test_metrics_match_query_block_jobs_for_a_paused_mirror(disk):
    server, ctl, qmp, target = disk
    qmp("drive-mirror", device="disk0", target=str(target), sync="full", job_id="m0",
        speed=4 * MiB, on_source_error="stop", copy_mode="write-blocking")
    qmp.wait_status("m0", "running")
    qmp("block-job-pause", device="m0")
    qmp.wait_status("m0", "paused")
    info = qmp.job("m0")
    got = job_series(metrics(ctl), "m0")
    assert qmp.job("m0") == info                    # nothing moved meanwhile
    want = expected_from(info)
    assert {k: v for k, v in got.items() if v or k in want} == want
    assert got[("overlay_nbd_job_status", (("status", "paused"),))] == 1
    assert got[("overlay_nbd_job_info", (("auto_dismiss", "true"), ("auto_finalize", "true"),
                                         ("copy_mode", "write-blocking"),
                                         ("on_source_error", "stop"),
                                         ("on_target_error", "report")))] == 1
    qmp("block-job-cancel", device="m0", force=True)
    qmp.close()


def test_metrics_match_query_block_jobs_for_a_paused_backup(disk):
    server, ctl, qmp, target = disk
    qmp("drive-backup", device="disk0", target=str(target), sync="full", job_id="b0",
        speed=4 * MiB, on_target_error="stop", on_cbw_error="break-snapshot")
    qmp.wait_status("b0", "running")
    qmp("block-job-pause", device="b0")
    qmp.wait_status("b0", "paused")
    info = qmp.job("b0")
    assert info["type"] == "backup"
    got = job_series(metrics(ctl), "b0")
    assert qmp.job("b0") == info                    # nothing moved meanwhile
    want = expected_from(info)
    assert {k: v for k, v in got.items() if v or k in want} == want
    assert got[("overlay_nbd_job_status", (("status", "paused"),))] == 1
    assert got[("overlay_nbd_job_info", (("auto_dismiss", "true"), ("auto_finalize", "true"),
                                         ("on_cbw_error", "break-snapshot"),
                                         ("on_source_error", "report"),
                                         ("on_target_error", "stop")))] == 1
    qmp("block-job-cancel", device="b0", force=True)
    qmp.close()


def test_errors_by_errno_and_io_status_of_a_mirror_stopped_by_target_errors(servers, tmp_path):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, 4 * MiB)], seed=4)
    ctl = tmp_path / "ctl.sock"
    servers.overlay(tmp_path / "ov", base=base, control=str(ctl))
    target = make_image(tmp_path / "t.img", 4 * MiB)
    bad = servers.nbdkit("file", target, "error=ENOSPC", "error-pwrite-rate=100%",
                         filters=["error"])
    qmp = Control(ctl)
    qmp("drive-mirror", device="disk0", target=bad.uri, sync="full", job_id="m0",
        on_target_error="stop")
    qmp.wait_status("m0", "paused")
    # Writes in flight when it stopped may still fail: read once nothing moves any more.
    deadline = time.monotonic() + 30
    while True:
        info = qmp.job("m0")
        got = job_series(metrics(ctl), "m0")
        if qmp.job("m0") == info or time.monotonic() > deadline:
            break
    assert info["io-status"] == "nospace" and info["paused"]
    assert got[("overlay_nbd_job_io_status", (("io_status", "nospace"),))] == 1
    errors = {k: v for k, v in got.items() if k[0] == "overlay_nbd_job_errors_total"}
    assert errors == {("overlay_nbd_job_errors_total", (("errno", "ENOSPC"),
                                                        ("operation", "write"))):
                      info["x-error-counts"][0]["count"]}
    assert len(info["x-error-counts"]) == 1 and info["x-error-counts"][0]["count"] >= 1
    assert got[("overlay_nbd_job_last_error_time_seconds",
                (("errno", "ENOSPC"), ("operation", "write")))] > 0
    qmp("block-job-cancel", device="m0", force=True)
    qmp.close()


def test_disk_and_process_metrics_match_the_server(servers, tmp_path, connect):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, 4 * MiB)], seed=5)
    fault = tmp_path / "fault"
    base_srv = servers.nbdkit("file", base, "error=EIO", "error-pread-rate=100%",
                              "error-file=%s" % fault, filters=["error"])
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(tmp_path / "ov", base=base_srv.uri, rerror="stop", control=str(ctl))
    qmp = Control(ctl)
    h = connect(srv.uri)
    h.pwrite(b"w" * 65536, 0)
    connect(srv.uri)                                  # a second client, idle
    fault.touch()
    reader = threading.Thread(target=lambda: h.pread(MiB, MiB))
    reader.start()
    qmp.wait_event("BLOCK_IO_ERROR", timeout=30)
    p = metrics(ctl)
    d = {"device": "disk0"}

    def m(name, **labels):
        return p[(name, frozenset(dict(d, **labels).items()))]

    assert m("overlay_nbd_disk_held_requests") == 1
    assert m("overlay_nbd_disk_io_status", io_status="failed") == 1
    assert m("overlay_nbd_disk_clusters", state="data") == 1
    assert m("overlay_nbd_disk_size_bytes") == 4 * MiB
    assert m("overlay_nbd_client_connections") == 2
    assert m("overlay_nbd_client_connections_total") == 2
    nbdkit_pid = qmp.execute("x-query-process")["pid"]
    assert nbdkit_pid == srv.pid or open("/proc/%d/cmdline" % nbdkit_pid, "rb").read() \
        .startswith(b"nbdkit")
    fds = len(os.listdir("/proc/%d/fd" % nbdkit_pid))
    assert abs(m("overlay_nbd_process_open_fds") - fds) <= 4
    assert m("overlay_nbd_process_resident_memory_bytes") > 10 * MiB
    assert m("overlay_nbd_process_threads") >= 3
    fault.unlink()
    qmp("cont")
    reader.join(30)
    assert not reader.is_alive()
    p = metrics(ctl)
    assert m("overlay_nbd_disk_held_requests") == 0
    assert m("overlay_nbd_disk_io_status", io_status="ok") == 1
    qmp.close()


class Endpoint:
    """`jobctl metrics --listen 127.0.0.1:0`, the URL it printed, and a scrape."""

    def __init__(self, ctl):
        self.proc = subprocess.Popen([jobctl_path(), "--socket", str(ctl), "metrics",
                                      "--listen", "127.0.0.1:0", "--timeout", "5"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("jobctl: metrics: serving http://127.0.0.1:"), \
            line + self.proc.stderr.read()
        self.url = line.split()[3]

    def get(self, path="/metrics"):
        with urllib.request.urlopen(self.url.replace("/metrics", path), timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(10)


def test_http_endpoint_answers_a_scrape_and_outlives_a_restart(servers, tmp_path):
    ctl = tmp_path / "ctl.sock"
    srv = servers.overlay(tmp_path / "ov", size="8M", control=str(ctl))
    endpoint = Endpoint(ctl)
    try:
        status, kind, body = endpoint.get()
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        p = parse(body)
        assert p[("overlay_nbd_up", frozenset({("control", str(ctl))}))] == 1
        assert p[("overlay_nbd_disk_size_bytes", frozenset({("device", "disk0")}))] == 8 * MiB
        with pytest.raises(urllib.error.HTTPError) as e:
            endpoint.get("/other")
        assert e.value.code == 404
        srv.stop()
        status, _, body = endpoint.get()
        assert status == 200 and parse(body) == {
            ("overlay_nbd_up", frozenset({("control", str(ctl))})): 0}
        servers.restart(srv)
        assert parse(endpoint.get()[2])[("overlay_nbd_up", frozenset({("control", str(ctl))}))] == 1
    finally:
        code = endpoint.stop()
    assert code == 0                                   # SIGTERM is the normal stop
    log = endpoint.proc.stderr.read()
    assert "control socket not answering" in log and "answering again" in log


def test_listen_on_an_address_in_use_fails_with_one_line(servers, tmp_path):
    import socket
    ctl = tmp_path / "ctl.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([jobctl_path(), "--socket", str(ctl), "metrics", "--listen",
                              "127.0.0.1:%d" % port], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.startswith("jobctl: error: metrics: cannot listen on 127.0.0.1:%d" % port)
    assert out.stderr.count("\n") == 1


def test_output_writes_the_file_for_node_exporter(servers, tmp_path):
    ctl = tmp_path / "ctl.sock"
    servers.overlay(tmp_path / "ov", size="8M", control=str(ctl))
    out = tmp_path / "overlay.prom"
    run = subprocess.run([jobctl_path(), "--socket", str(ctl), "metrics", "--output", str(out)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout == ""
    assert parse(out.read_text())[("overlay_nbd_disk_size_bytes",
                                   frozenset({("device", "disk0")}))] == 8 * MiB


def test_metrics_with_no_server_exits_3(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobctl", "--socket", str(tmp_path / "none.sock"),
                          "metrics"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 3 and "server not running" in out.stderr
