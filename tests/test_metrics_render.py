"""jobctl/metrics.py without a server: QMP replies in, Prometheus text out, read back by
the Prometheus client library's own parser."""

import argparse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobctl.metrics import render, render_down
from jobctl.metrics_cli import listen_address, write_atomically

DISK = {"device": "disk0", "size": 1 << 30, "base": "/srv/base.img", "active": None,
        "overlay": "/var/lib/overlay-nbd/disk1", "io-status": "ok", "held": False,
        "x-held-requests": 2,
        "allocation": {"cluster-size": 65536, "clusters": 16384, "data-clusters": 10,
                       "zero-clusters": 4, "absent-clusters": 16370}}
JOB = {"type": "mirror", "device": "m0", "len": 1000, "offset": 400, "busy": True,
       "paused": False, "speed": 0, "io-status": "ok", "ready": False, "status": "running",
       "auto-finalize": True, "auto-dismiss": False, "x-copied-bytes": 300,
       "x-policies": {"on-source-error": "report", "on-target-error": "stop",
                      "copy-mode": "background"},
       "x-last-error": {"operation": "write", "errno": "ENOSPC", "desc": "No space left on device",
                        "count": 1, "time": {"seconds": 1700000000, "microseconds": 500000}},
       "x-error-counts": [{"operation": "write", "errno": "EIO", "count": 3},
                          {"operation": "write", "errno": "ENOSPC", "count": 1}]}
PROCESS = {"pid": 42, "rss-bytes": 30 << 20, "fds": 23, "fd-limit": 1024, "threads": 6,
           "cpu-seconds": 1.5, "start-time": 1700000000.25, "nbd-connections": 2,
           "nbd-connections-total": 9}


def samples(text):
    """{(sample name, frozenset(labels)): value} as the Prometheus parser reads text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, "duplicate series %r" % (key,)
            out[key] = s.value
    return out


def value(parsed, name, **labels):
    return parsed[(name, frozenset(labels.items()))]


J = {"job_id": "m0", "device": "disk0", "type": "mirror"}


def test_disk_job_and_process_metrics_parse_and_carry_the_replies_values():
    text = render("/s/control.sock", [DISK], [JOB], [{"id": "m0", "status": "running"}], PROCESS)
    p = samples(text)
    assert value(p, "overlay_nbd_up", control="/s/control.sock") == 1
    assert value(p, "overlay_nbd_disk_size_bytes", device="disk0") == 1 << 30
    assert value(p, "overlay_nbd_disk_clusters", device="disk0", state="data") == 10
    assert value(p, "overlay_nbd_disk_clusters", device="disk0", state="absent") == 16370
    assert value(p, "overlay_nbd_disk_held_requests", device="disk0") == 2
    assert value(p, "overlay_nbd_disk_io_status", device="disk0", io_status="ok") == 1
    assert value(p, "overlay_nbd_disk_io_status", device="disk0", io_status="nospace") == 0
    assert value(p, "overlay_nbd_disk_info", device="disk0", base="/srv/base.img", active="",
                 overlay="/var/lib/overlay-nbd/disk1") == 1
    assert value(p, "overlay_nbd_job_offset_bytes", **J) == 400
    assert value(p, "overlay_nbd_job_length_bytes", **J) == 1000
    assert value(p, "overlay_nbd_job_copied_bytes_total", **J) == 300
    assert value(p, "overlay_nbd_job_status", status="running", **J) == 1
    assert sum(v for (name, _), v in p.items() if name == "overlay_nbd_job_status") == 1
    assert value(p, "overlay_nbd_job_errors_total", operation="write", errno="EIO", **J) == 3
    assert value(p, "overlay_nbd_job_errors_total", operation="write", errno="ENOSPC", **J) == 1
    assert value(p, "overlay_nbd_job_last_error_time_seconds", operation="write",
                 errno="ENOSPC", **J) == 1700000000.5
    assert value(p, "overlay_nbd_job_info", auto_finalize="true", auto_dismiss="false",
                 on_source_error="report", on_target_error="stop", copy_mode="background",
                 **J) == 1
    assert value(p, "overlay_nbd_job_busy", **J) == 1
    assert value(p, "overlay_nbd_job_failed", **J) == 0
    assert value(p, "overlay_nbd_process_resident_memory_bytes", device="disk0") == 30 << 20
    assert value(p, "overlay_nbd_process_cpu_seconds_total", device="disk0") == 1.5
    assert value(p, "overlay_nbd_client_connections", device="disk0") == 2
    assert value(p, "overlay_nbd_client_connections_total", device="disk0") == 9


def test_counter_families_are_typed_counter():
    text = render("/s", [DISK], [JOB], [], PROCESS)
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["overlay_nbd_job_copied_bytes"] == "counter"
    assert kinds["overlay_nbd_job_errors"] == "counter"
    assert kinds["overlay_nbd_process_cpu_seconds"] == "counter"
    assert kinds["overlay_nbd_job_offset_bytes"] == "gauge"


def test_bitmaps_appear_when_query_block_lists_them_and_not_otherwise():
    bitmaps = [{"name": "nightly", "count": 131072, "granularity": 65536, "recording": True,
                "busy": False, "persistent": True}]
    p = samples(render("/s", [dict(DISK, **{"dirty-bitmaps": bitmaps})], [], []))
    assert value(p, "overlay_nbd_disk_bitmaps", device="disk0") == 1
    assert value(p, "overlay_nbd_bitmap_dirty_bytes", device="disk0", bitmap="nightly") == 131072
    assert value(p, "overlay_nbd_bitmap_persistent", device="disk0", bitmap="nightly") == 1
    assert value(p, "overlay_nbd_bitmap_busy", device="disk0", bitmap="nightly") == 0
    without = samples(render("/s", [DISK], [], []))
    assert not [k for k in without if "bitmap" in k[0]]


def test_fields_an_older_server_leaves_out_leave_their_metrics_out():
    bare = {k: v for k, v in JOB.items() if not k.startswith("x-")}
    old_disk = {k: v for k, v in DISK.items() if not k.startswith("x-")}
    p = samples(render("/s", [old_disk], [bare], [], None))
    names = {name for name, _ in p}
    assert "overlay_nbd_job_copied_bytes_total" not in names
    assert "overlay_nbd_job_errors_total" not in names
    assert "overlay_nbd_disk_held_requests" not in names
    assert not [n for n in names if n.startswith("overlay_nbd_process_")]
    assert value(p, "overlay_nbd_job_info", auto_finalize="true", auto_dismiss="false", **J) == 1


def test_label_values_are_escaped_so_the_parser_reads_them_back():
    odd = dict(DISK, base='nbd+unix:///a"b\\c?socket=/x\ny')
    p = samples(render("/s", [odd], [], []))
    assert value(p, "overlay_nbd_disk_info", device="disk0", base='nbd+unix:///a"b\\c?socket=/x\ny',
                 active="", overlay="/var/lib/overlay-nbd/disk1") == 1


def test_an_unknown_state_still_gets_its_series():
    p = samples(render("/s", [], [dict(JOB, status="frobbing")], []))
    assert value(p, "overlay_nbd_job_status", job_id="m0", device="", type="mirror",
                 status="frobbing") == 1


def test_down_is_up_0_and_nothing_else():
    assert samples(render_down("/s/control.sock")) == {
        ("overlay_nbd_up", frozenset({("control", "/s/control.sock")})): 0}


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9732", ("127.0.0.1", 9732)), ("[::1]:0", ("::1", 0)),
    ("localhost:80", ("localhost", 80))])
def test_listen_address_takes_host_and_port(text, expected):
    assert listen_address(text) == expected


@pytest.mark.parametrize("text", ["9732", ":9732", "127.0.0.1:", "127.0.0.1:http",
                                  "127.0.0.1:70000"])
def test_listen_address_wants_an_explicit_host_and_a_port(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not ADDR:PORT"):
        listen_address(text)


def test_output_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path):
    target = tmp_path / "overlay.prom"
    target.write_text("old\n")
    write_atomically(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.prom"]
