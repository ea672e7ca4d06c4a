"""Text shown to people: the status table, progress bars, event lines.

Pure functions from data to strings, so they are tested without a server.
Machine-readable output (--json) does not go through here.
"""

import datetime
import json
import os
import shutil
import textwrap

from .jobs import done_and_total
from .units import format_duration, format_rate, format_size, format_speed_limit

BAR_WIDTH = 20
MIN_BAR_WIDTH = 5          # narrower than this, the bar goes and the percentage stays
SHRUNK_BAR_WIDTH = 10      # the bar shrinks to this before long ids get a line of their own
MIN_ERROR_WIDTH = 12       # an ERROR cell is cut ("...") to no less than this
KEPT_ID_WIDTH = 12         # ids up to this long stay in their row while bars can shrink

TABLE_COLUMNS = ("ID", "TYPE", "DEVICE", "STATUS", "PROGRESS", "SPEED", "IO-STATUS", "ERROR")
_DEVICE = TABLE_COLUMNS.index("DEVICE")
_ERROR = TABLE_COLUMNS.index("ERROR")
_GAP = "  "

# The order policies are shown in, and their defaults (as in QEMU).
POLICY_KEYS = ("on-source-error", "on-target-error", "on-error", "copy-mode")


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
    """The PROGRESS column: bar and percentage; width 0 is the percentage alone."""
    if width <= 0:
        return format_percent(fraction)
    return f"{progress_bar(fraction, width)} {format_percent(fraction)}"


def last_error_text(last_error):
    """x-last-error as one short phrase: "write EIO: Input/output error (x3)"; None is None."""
    if not isinstance(last_error, dict):
        return None
    words = [str(last_error[key]) for key in ("operation", "errno") if last_error.get(key)]
    text = " ".join(words)
    desc = last_error.get("desc")
    if desc:
        text = f"{text}: {desc}" if text else str(desc)
    count = last_error.get("count")
    if isinstance(count, int) and count > 1:
        text += f" (x{count})"
    return text or None


def policies_text(policies):
    """x-policies as "on-source-error=report on-target-error=stop copy-mode=background"."""
    if not isinstance(policies, dict) or not policies:
        return None
    keys = [k for k in POLICY_KEYS if k in policies] + sorted(set(policies) - set(POLICY_KEYS))
    return " ".join(f"{key}={_text(policies[key])}" for key in keys)


def error_cell(record):
    """The ERROR column: the error a job ended with, else the last error it met, else "-"."""
    if record.get("error"):
        return str(record["error"])
    return last_error_text(record.get("x-last-error")) or "-"


def job_row(record, bar_width=BAR_WIDTH):
    """The table cells for one job record (see jobctl.jobs.JOB_KEYS)."""
    return (
        _text(record["id"]),
        _text(record["type"]),
        _text(record["device"]),
        _status_text(record),
        progress_cell(record["progress"], bar_width),
        format_speed_limit(record["speed"]),
        _text(record["io-status"]),
        error_cell(record),
    )


def detail_lines(record, width=None):
    """Lines under a job's row: its policies, when the server reports them."""
    policies = policies_text(record.get("x-policies"))
    if not policies:
        return []
    return _wrapped("policies: " + policies, width)


def _wrapped(text, width):
    """An indented detail line, wrapped to width (None: one line)."""
    if width is None:
        return ["  " + text]
    return textwrap.wrap(text, width=width, initial_indent="  ", subsequent_indent="    ",
                         break_on_hyphens=False, break_long_words=True)


def render_table(records, width=None):
    """Return the status table for these job records, or "no jobs".

    width None (not a terminal): every column at its natural width. With a
    width, every line fits in it: the DEVICE column goes when it only
    repeats the id, the bars shrink, ids too long for their column get a
    line of their own, then long ERROR texts are cut.
    """
    if not records:
        return "no jobs"
    if width is None:
        lines = []
        rows = [job_row(r) for r in records]
        widths = _widths([TABLE_COLUMNS] + rows)
        lines.append(_join(TABLE_COLUMNS, widths))
        for record, row in zip(records, rows):
            lines.append(_join(row, widths))
            lines.extend(detail_lines(record))
        return "\n".join(lines)
    return "\n".join(_fitted_table(records, width))


def _fitted_table(records, width):
    all_columns = list(range(len(TABLE_COLUMNS)))
    without_device = [i for i in all_columns if i != _DEVICE]
    if all(r["device"] in (None, r["id"]) for r in records):
        column_sets = [without_device]
    else:
        column_sets = [all_columns, without_device]
    bar_widths = list(range(BAR_WIDTH, SHRUNK_BAR_WIDTH - 1, -1))
    narrow_bars = list(range(SHRUNK_BAR_WIDTH - 1, MIN_BAR_WIDTH - 1, -1)) + [0]
    id_lengths = [len(_text(r["id"])) for r in records]
    longest = max(id_lengths)
    kept = max([n for n in id_lengths if n <= KEPT_ID_WIDTH], default=0)
    # (columns, ids that must keep their row: up to how long, bar width, cut errors),
    # least damage first.
    # A cut error is shown whole under its row, so cutting it costs less
    # than narrowing the bars below SHRUNK_BAR_WIDTH.
    attempts = []
    for columns in column_sets:
        attempts += ([(columns, longest, b, False) for b in bar_widths]
                     + [(columns, kept, b, False) for b in bar_widths]
                     + [(columns, kept, b, True) for b in bar_widths + narrow_bars]
                     + [(columns, 0, b, True) for b in bar_widths + narrow_bars])
    for columns, kept_id_width, bar_width, cut_errors in attempts:
        header = [TABLE_COLUMNS[i] for i in columns]
        rows = [[job_row(r, bar_width)[i] for i in columns] for r in records]
        lines = _layout(header, rows, width, kept_id_width, cut_errors)
        if lines is not None:
            break
    else:
        # Narrower than any layout: the last one, each line cut rather than wrapped.
        lines = [line if line is _ROW_END else line[:width].rstrip()
                 for line in _layout(header, rows, width, 0, True, force=True)]
    out = []
    row_index = 0
    for line in lines:
        if line is _ROW_END:
            record = records[row_index]
            error = error_cell(record)
            if not out[-1].endswith(error):
                # Cut to fit: the whole text goes under the row.
                out.extend(_wrapped("error: " + error, width))
            out.extend(detail_lines(record, width))
            row_index += 1
        else:
            out.append(line)
    return out


_ROW_END = object()     # marks where a row's detail lines go


def _layout(header, rows, width, kept_id_width, cut_errors, force=False):
    """Lines for this layout (with _ROW_END after each row), or None if it does not fit.

    Column 0 is the id, the last one the error text. An id that does not fit
    its column goes on a line of its own, above its row; every id up to
    kept_id_width long must fit. force: lay out even what does not fit.
    """
    natural = _widths([header] + rows)
    middle, error_width = natural[1:-1], natural[-1]
    gaps = len(_GAP) * (len(header) - 1)
    if cut_errors:
        error_width = min(error_width, max(MIN_ERROR_WIDTH, len(header[-1])))
    rest_total = sum(middle) + error_width + gaps
    ids = [row[0] for row in rows]
    id_width = natural[0]
    if width is not None and id_width + rest_total > width:
        room = width - rest_total
        if room < max(len(header[0]), kept_id_width) and not force:
            return None
        id_width = max([len(header[0])] + [len(i) for i in ids if len(i) <= room])
    if width is not None and id_width + rest_total > width:
        if not force:
            return None
        id_width = len(header[0])
    if width is not None and cut_errors:
        error_width = max(error_width, width - id_width - sum(middle) - gaps)
        rows = [row[:-1] + [_cut(row[-1], error_width)] for row in rows]
    widths = [id_width] + middle + [error_width]
    lines = [_join(header, widths)]
    for row in rows:
        if len(row[0]) > id_width:
            lines.append(row[0])
            row = [""] + row[1:]
        lines.append(_join(row, widths))
        lines.append(_ROW_END)
    return lines


def _widths(rows):
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def _join(cells, widths):
    return _GAP.join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()


def _cut(text, width):
    """text, or its first characters and "..." so that it is `width` long."""
    if len(text) <= width:
        return text
    return text[:max(0, width - 3)] + "..."


def terminal_columns(stream):
    """The width of the terminal stream writes to, or None if it is not a terminal.

    The terminal's own size comes first: an exported $COLUMNS goes stale
    when the window is resized. $COLUMNS (else 80) is only the fallback.
    """
    try:
        if not stream.isatty():
            return None
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size().columns


def is_paused(record):
    """True while a job is paused, or a pause was asked for (it makes no progress)."""
    return bool(record.get("paused")) or record.get("status") in ("paused", "standby")


def progress_line(record, rate=None, eta=None, bar=True, width=None):
    """One line describing a job in progress, for `wait`.

    With bar=True (a terminal): "[####----]  40.0%  400.0 MiB/1.0 GiB  12.0 MiB/s  ETA 0:50  running".
    With bar=False (a log): "job0: running 40.0% 400.0 MiB/1.0 GiB 12.0 MiB/s ETA 0:50".
    A paused job has no rate and no ETA. With a width, the line fits in it:
    the bar shrinks (then goes), then the amount, the rate and the ETA go.
    """
    done, total = done_and_total(record)
    amount = f"{format_size(done)}/{format_size(total)}" if total else "-"
    status = _status_text(record)
    paused = is_paused(record)
    speed = [] if paused else [format_rate(rate), f"ETA {format_duration(eta)}"]
    if not bar:
        return " ".join([f"{record['id']}:", status, format_percent(record["progress"]).strip(),
                         amount, *speed])
    fraction = record["progress"]
    candidates = [[progress_cell(fraction, w), amount, *speed, status]
                  for w in range(BAR_WIDTH, MIN_BAR_WIDTH - 1, -1)]
    candidates.append([format_percent(fraction), amount, *speed, status])
    candidates.append([format_percent(fraction), *speed, status])
    candidates.append([format_percent(fraction), *speed[1:], status])
    candidates.append([format_percent(fraction), status])
    for parts in candidates:
        line = "  ".join(parts)
        if width is None or len(line) <= width:
            return line
    return line[:width]


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
