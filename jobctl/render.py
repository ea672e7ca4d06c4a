"""Text shown to people: the status table, progress bars, event lines.

Pure functions from data to strings, so they are tested without a server.
Machine-readable output (--json) does not go through here.
"""

import datetime
import json

from .jobs import done_and_total
from .units import format_duration, format_rate, format_size, format_speed_limit

BAR_WIDTH = 20

TABLE_COLUMNS = ("ID", "TYPE", "DEVICE", "STATUS", "PROGRESS", "SPEED", "IO-STATUS", "ERROR")


def progress_bar(fraction, width=BAR_WIDTH):
    """Return "[#####---------------]" for 0.25; unknown (None) is all blanks."""
    if fraction is None:
        return "[" + " " * width + "]"
    fraction = max(0.0, min(1.0, fraction))
    filled = int(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_percent(fraction):
    """Return " 42.0%" (fixed width 6) or "     -" when unknown."""
    if fraction is None:
        return "     -"
    # Never round an unfinished job up to 100%.
    percent = fraction * 100
    if fraction < 1.0:
        percent = min(percent, 99.9)
    return f"{percent:5.1f}%"


def progress_cell(fraction, width=BAR_WIDTH):
    """The PROGRESS column: bar and percentage."""
    return f"{progress_bar(fraction, width)} {format_percent(fraction)}"


def job_row(record):
    """The table cells for one job record (see jobctl.jobs.JOB_KEYS)."""
    return (
        _text(record["id"]),
        _text(record["type"]),
        _text(record["device"]),
        _status_text(record),
        progress_cell(record["progress"]),
        format_speed_limit(record["speed"]),
        _text(record["io-status"]),
        _text(record["error"]),
    )


def render_table(records):
    """Return the status table for these job records, or "no jobs"."""
    if not records:
        return "no jobs"
    rows = [TABLE_COLUMNS] + [job_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def progress_line(record, rate=None, eta=None, bar=True):
    """One line describing a job in progress, for `wait`.

    With bar=True (a terminal): "[####----]  40.0%  400.0 MiB/1.0 GiB  12.0 MiB/s  ETA 0:50  running".
    With bar=False (a log): "job0: running 40.0% 400.0 MiB/1.0 GiB 12.0 MiB/s ETA 0:50".
    """
    done, total = done_and_total(record)
    amount = f"{format_size(done)}/{format_size(total)}" if total else "-"
    status = _status_text(record)
    rate_text = format_rate(rate)
    eta_text = f"ETA {format_duration(eta)}"
    if bar:
        return "  ".join([progress_cell(record["progress"]), amount, rate_text, eta_text, status])
    return " ".join([f"{record['id']}:", status, format_percent(record["progress"]).strip(),
                     amount, rate_text, eta_text])


def event_line(event):
    """A human line for an event: "2024-05-01 12:00:00.123456 NAME key=value ..."."""
    stamp = event.get("timestamp") or {}
    seconds = stamp.get("seconds")
    if isinstance(seconds, (int, float)):
        when = datetime.datetime.fromtimestamp(seconds).replace(
            microsecond=int(stamp.get("microseconds") or 0))
        when_text = when.strftime("%Y-%m-%d %H:%M:%S.%f")
    else:
        when_text = "-"
    parts = [when_text, str(event.get("event"))]
    data = event.get("data")
    if isinstance(data, dict):
        parts.extend(f"{key}={_value_text(value)}" for key, value in data.items())
    elif data is not None:
        parts.append(_value_text(data))
    return " ".join(parts)


def _status_text(record):
    """Status, flagged when paused by the user so it is not mistaken for running."""
    status = _text(record["status"])
    if record.get("paused") and status not in ("paused", "standby"):
        status += " (pausing)"
    return status


def _value_text(value):
    """Event values: bare when simple, quoted when they contain spaces."""
    if isinstance(value, str):
        if value and not any(c.isspace() or c in "\"'=" for c in value):
            return value
        return json.dumps(value)
    return json.dumps(value, sort_keys=True)


def _text(value):
    return "-" if value is None or value == "" else str(value)
