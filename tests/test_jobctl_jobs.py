"""Merging query-block-jobs and query-jobs into jobctl's stable job records."""

from jobctl.jobs import JOB_KEYS, event_job_id, merge_jobs, progress_fraction

BLOCK_JOB = {"type": "mirror", "device": "m0", "len": 1000, "offset": 250, "busy": True,
             "paused": False, "speed": 0, "ready": False, "status": "running", "io-status": "ok",
             "auto-finalize": True, "auto-dismiss": False}
JOB = {"id": "m0", "type": "mirror", "status": "running", "current-progress": 250,
       "total-progress": 1000}


def test_record_has_exactly_the_documented_keys_in_order():
    record = merge_jobs([BLOCK_JOB], [JOB])[0]
    assert tuple(record) == JOB_KEYS


def test_missing_values_are_null():
    record = merge_jobs(None, [JOB])[0]
    assert record["io-status"] is None
    assert record["device"] is None


def test_block_job_and_job_with_same_id_merge_into_one_record():
    records = merge_jobs([BLOCK_JOB], [JOB])
    assert len(records) == 1
    assert records[0]["id"] == "m0"
    assert records[0]["current-progress"] == 250
    assert records[0]["len"] == 1000


def test_status_comes_from_query_jobs():
    records = merge_jobs([BLOCK_JOB], [dict(JOB, status="paused")])
    assert records[0]["status"] == "paused"


def test_error_from_query_jobs_fills_in_when_block_info_has_none():
    records = merge_jobs([BLOCK_JOB], [dict(JOB, status="concluded", error="Input/output error")])
    assert records[0]["error"] == "Input/output error"


def test_jobs_only_in_query_jobs_come_after_block_jobs():
    records = merge_jobs([BLOCK_JOB], [JOB, dict(JOB, id="other")])
    assert [r["id"] for r in records] == ["m0", "other"]


def test_block_job_with_separate_id_uses_it():
    records = merge_jobs([dict(BLOCK_JOB, id="j1", device="disk0")], None)
    assert (records[0]["id"], records[0]["device"]) == ("j1", "disk0")


def test_progress_is_offset_over_len():
    assert merge_jobs([BLOCK_JOB], None)[0]["progress"] == 0.25


def test_progress_falls_back_to_job_progress():
    assert merge_jobs(None, [dict(JOB, **{"current-progress": 500})])[0]["progress"] == 0.5


def test_progress_unknown_for_zero_length():
    assert progress_fraction({"offset": 0, "len": 0}) is None


def test_event_job_id_reads_id_or_device():
    assert event_job_id({"id": "a", "status": "running"}) == "a"
    assert event_job_id({"device": "b", "type": "mirror"}) == "b"
    assert event_job_id(None) is None
