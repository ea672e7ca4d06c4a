"""jobctl's human output: progress bars, the status table, event and progress lines."""

from jobctl.jobs import merge_jobs
from jobctl.render import (
    event_line,
    format_percent,
    progress_bar,
    progress_line,
    render_table,
)

MiB = 1024 ** 2


def mirror_record(**changes):
    block = {"type": "mirror", "device": "job0", "len": 100 * MiB, "offset": 25 * MiB,
             "busy": True, "paused": False, "speed": 0, "ready": False, "status": "running",
             "io-status": "ok", "auto-finalize": True, "auto-dismiss": True}
    block.update(changes)
    return merge_jobs([block], None)[0]


def test_progress_bar_fills_in_proportion():
    assert progress_bar(0.25, width=8) == "[##------]"


def test_progress_bar_empty_and_full():
    assert progress_bar(0.0, width=4) == "[----]"
    assert progress_bar(1.0, width=4) == "[####]"


def test_progress_bar_unknown_is_blank():
    assert progress_bar(None, width=4) == "[    ]"


def test_progress_bar_clamps_out_of_range():
    assert progress_bar(1.7, width=4) == "[####]"
    assert progress_bar(-1, width=4) == "[----]"


def test_percent_never_rounds_unfinished_up_to_100():
    assert format_percent(0.99999) == " 99.9%"


def test_percent_of_finished_is_100():
    assert format_percent(1.0) == "100.0%"


def test_percent_unknown_is_dash():
    assert format_percent(None).strip() == "-"


def test_table_has_header_and_one_row_per_job():
    lines = render_table([mirror_record(), mirror_record(device="job1")]).splitlines()
    assert lines[0].split() == ["ID", "TYPE", "DEVICE", "STATUS", "PROGRESS", "SPEED",
                                "IO-STATUS", "ERROR"]
    assert [line.split()[0] for line in lines[1:]] == ["job0", "job1"]


def test_table_row_shows_bar_percent_speed_and_io_status():
    row = render_table([mirror_record(speed=10 * MiB, **{"io-status": "failed"})]).splitlines()[1]
    assert "[#####---------------]  25.0%" in row
    assert "10.0 MiB/s" in row
    assert "failed" in row


def test_table_shows_unlimited_for_speed_zero():
    assert "unlimited" in render_table([mirror_record()])


def test_table_columns_are_aligned():
    records = [mirror_record(device="a"), mirror_record(device="a-much-longer-id")]
    lines = render_table(records).splitlines()
    starts = {line.index("mirror") for line in lines[1:]}
    assert len(starts) == 1


def test_table_shows_error_text():
    record = mirror_record(status="concluded", error="Input/output error")
    assert render_table([record]).splitlines()[1].endswith("Input/output error")


def test_table_flags_a_pause_request_not_yet_honoured():
    assert "running (pausing)" in render_table([mirror_record(paused=True)])


def test_empty_table_says_no_jobs():
    assert render_table([]) == "no jobs"


def test_progress_line_for_terminal_has_bar_amount_rate_eta_status():
    line = progress_line(mirror_record(), rate=5 * MiB, eta=15, bar=True)
    assert line.startswith("[#####")
    assert "25.0 MiB/100.0 MiB" in line
    assert "5.0 MiB/s" in line
    assert "ETA 0:15" in line
    assert line.endswith("running")


def test_progress_line_plain_starts_with_job_id_and_status():
    line = progress_line(mirror_record(), rate=None, eta=None, bar=False)
    assert line == "job0: running 25.0% 25.0 MiB/100.0 MiB - ETA --:--"


def test_event_line_shows_name_and_data_pairs():
    event = {"event": "JOB_STATUS_CHANGE", "data": {"id": "job0", "status": "running"},
             "timestamp": {"seconds": 1700000000, "microseconds": 5}}
    line = event_line(event)
    assert line.endswith(" JOB_STATUS_CHANGE id=job0 status=running")
    assert ".000005 " in line


def test_event_line_quotes_values_with_spaces():
    event = {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "job0", "error": "Input/output error"},
             "timestamp": {"seconds": 1700000000, "microseconds": 0}}
    assert 'error="Input/output error"' in event_line(event)


def test_event_line_without_data():
    event = {"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 0}}
    assert event_line(event).endswith(" STOP")
