"""jobctl's human output at a fixed terminal width, and the server's extension fields.

Sample BlockJobInfo dicts carry the extension fields the server adds
(x-last-error, x-policies, x-copied-bytes); the output is checked for fitting
in the width and for saying the right things.
"""

import pytest

from jobctl.jobs import JOB_KEYS, merge_jobs
from jobctl.render import (
    error_cell,
    event_line,
    last_error_text,
    policies_text,
    progress_line,
    render_table,
)

MiB = 1024 ** 2
LONG_ID = "nightly-backup-of-the-database-disk-to-the-second-site"
LAST_ERROR = {"operation": "write", "errno": "EIO", "desc": "Input/output error", "count": 3,
              "time": {"seconds": 1714557600, "microseconds": 250}}
POLICIES = {"on-source-error": "report", "on-target-error": "stop", "copy-mode": "background"}


def block_job(job_id="disk0", **changes):
    info = {"type": "mirror", "device": job_id, "len": 100 * MiB, "offset": 25 * MiB,
            "busy": True, "paused": False, "speed": 0, "ready": False, "status": "running",
            "io-status": "ok", "auto-finalize": True, "auto-dismiss": True}
    info.update(changes)
    return info


def records(*infos):
    return merge_jobs(list(infos), None)


def widest(text):
    return max(len(line) for line in text.splitlines())


# status table

@pytest.mark.parametrize("width", [80, 120])
def test_table_fits_and_drops_the_device_column_that_repeats_the_id(width):
    table = render_table(records(block_job(), block_job("m1", status="paused", paused=True)),
                         width=width)
    assert widest(table) <= width
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "IO-STATUS", "ERROR"]
    assert lines[1].split()[:3] == ["disk0", "mirror", "running"]
    assert lines[2].split()[:3] == ["m1", "mirror", "paused"]


def test_table_keeps_a_device_column_that_says_something_else():
    table = render_table(records(block_job("j1", id="j1", device="disk0")), width=120)
    assert table.splitlines()[0].split()[2] == "DEVICE"
    assert table.splitlines()[1].split()[:3] == ["j1", "mirror", "disk0"]


def test_table_keeps_the_full_bar_when_there_is_room():
    table = render_table(records(block_job()), width=120)
    assert "[#####---------------]  25.0%" in table


def test_table_shrinks_the_bar_to_make_room_at_80_columns():
    record = records(block_job(paused=True, speed=10 * MiB))     # "running (pausing)", a speed
    table = render_table(record, width=80)
    row = table.splitlines()[1]
    assert widest(table) <= 80
    assert row.split()[:4] == ["disk0", "mirror", "running", "(pausing)"]
    bar = row[row.index("["):row.index("]") + 1]
    assert 5 <= len(bar) - 2 < 20
    assert "25.0%" in row and "10.0 MiB/s" in row


@pytest.mark.parametrize("width", [80, 120])
def test_a_long_job_id_gets_a_line_of_its_own(width):
    table = render_table(records(block_job(), block_job(LONG_ID)), width=width)
    lines = table.splitlines()
    assert widest(table) <= width
    assert lines[1].split()[:3] == ["disk0", "mirror", "running"]
    assert lines[2] == LONG_ID
    assert lines[3].split()[:2] == ["mirror", "running"] and lines[3].startswith(" ")


def test_without_a_width_the_table_is_unchanged():
    lines = render_table(records(block_job(LONG_ID))).splitlines()
    assert lines[0].split()[:3] == ["ID", "TYPE", "DEVICE"]
    assert lines[1].split()[:3] == [LONG_ID, "mirror", LONG_ID]


# last error and policies

def test_last_error_text_names_operation_errno_text_and_count():
    assert last_error_text(LAST_ERROR) == "write EIO: Input/output error (x3)"
    assert last_error_text(dict(LAST_ERROR, count=1)) == "write EIO: Input/output error"
    assert last_error_text(None) is None


def test_error_column_shows_the_last_error_of_a_running_job():
    [record] = records(block_job(status="paused", **{"io-status": "failed",
                                                     "x-last-error": LAST_ERROR}))
    assert error_cell(record) == "write EIO: Input/output error (x3)"
    row = render_table([record], width=120).splitlines()[1]
    assert row.endswith("failed     write EIO: Input/output error (x3)")


def test_error_column_prefers_the_error_a_job_ended_with():
    [record] = records(block_job(status="concluded", error="No space left on device",
                                 **{"x-last-error": LAST_ERROR}))
    assert error_cell(record) == "No space left on device"


FIRE = " ".join(["the disk is on fire"] * 4)


def test_a_cut_error_is_shown_whole_under_the_row():
    [record] = records(block_job(paused=True, speed=10 * MiB,
                                 **{"x-last-error": dict(LAST_ERROR, desc=FIRE)}))
    table = render_table([record], width=80)
    lines = table.splitlines()
    assert widest(table) <= 80
    assert lines[1].endswith("...")
    assert " ".join(line.strip() for line in lines[2:]) == (
        "error: write EIO: " + FIRE + " (x3)")


def test_policies_line_under_the_row():
    [record] = records(block_job(**{"x-policies": POLICIES}))
    lines = render_table([record], width=80).splitlines()
    assert lines[2] == "  policies: on-source-error=report on-target-error=stop copy-mode=background"
    assert render_table([record]).splitlines()[2] == lines[2]


def test_stream_policy_is_on_error():
    assert policies_text({"on-error": "ignore"}) == "on-error=ignore"


def test_policies_line_wraps_at_the_width():
    [record] = records(block_job(**{"x-policies": POLICIES}))
    table = render_table([record], width=50)
    assert widest(table) <= 50
    assert "copy-mode=background" in table


def test_no_extension_fields_no_extra_lines():
    assert len(render_table(records(block_job()), width=80).splitlines()) == 2


def test_json_records_pass_the_extension_fields_through():
    [record] = records(block_job(**{"x-last-error": LAST_ERROR, "x-policies": POLICIES,
                                    "x-copied-bytes": 5 * MiB}))
    assert tuple(record) == JOB_KEYS
    assert (record["x-last-error"], record["x-policies"], record["x-copied-bytes"]) == (
        LAST_ERROR, POLICIES, 5 * MiB)


def test_json_records_have_null_extension_fields_when_absent():
    [record] = records(block_job())
    assert (record["x-last-error"], record["x-policies"], record["x-copied-bytes"]) == (
        None, None, None)


def test_block_job_error_event_shows_errno_and_text():
    event = {"event": "BLOCK_JOB_ERROR", "timestamp": {"seconds": 1714557600, "microseconds": 0},
             "data": {"device": "disk0", "operation": "write", "action": "stop",
                      "x-errno": "ENOSPC", "x-desc": "No space left on device"}}
    assert event_line(event).endswith(
        ' BLOCK_JOB_ERROR device=disk0 operation=write action=stop x-errno=ENOSPC '
        'x-desc="No space left on device"')


# wait's progress line

@pytest.mark.parametrize("width", [79, 119])
def test_progress_line_fits_and_keeps_every_part(width):
    [record] = records(block_job(offset=400 * MiB, len=1024 * MiB, speed=10 * MiB))
    line = progress_line(record, rate=12 * MiB, eta=50, bar=True, width=width)
    assert len(line) <= width
    assert line.startswith("[") and "39.1%" in line
    for part in ("400.0 MiB/1.0 GiB", "12.0 MiB/s", "ETA 0:50", "running"):
        assert part in line


def test_progress_line_shrinks_the_bar_first():
    [record] = records(block_job(offset=400 * MiB, len=1024 * MiB, paused=False))
    wide = progress_line(record, rate=1023 * MiB, eta=3599, bar=True, width=200)
    narrow = progress_line(record, rate=1023 * MiB, eta=3599, bar=True, width=len(wide) - 5)
    assert narrow.split("]")[1:] == wide.split("]")[1:]
    assert narrow.index("]") == wide.index("]") - 5


def test_progress_line_drops_parts_rather_than_wrap():
    [record] = records(block_job())
    line = progress_line(record, rate=12 * MiB, eta=50, bar=True, width=40)
    assert len(line) <= 40 and "25.0%" in line and line.endswith("running")


def test_paused_job_has_no_rate_and_no_eta():
    [record] = records(block_job(status="paused", paused=True))
    assert progress_line(record, rate=12 * MiB, eta=50, bar=False) == (
        "disk0: paused 25.0% 25.0 MiB/100.0 MiB")
    line = progress_line(record, rate=12 * MiB, eta=50, bar=True, width=79)
    assert "ETA" not in line and "MiB/s" not in line and line.endswith("paused")
