"""Benchmark results: groups of rows of samples, medians, ratios to an anchor, goals.

A group is one table: rows measured the same way (e.g. "read 1 GiB with
nbdcopy"), one of which may be the anchor that the others are divided by.
Measurements on these machines are noisy, so only ratios to an anchor measured
in the same run are meant to be compared across machines and days.  Beside the
wall time, a row may record the CPU seconds each sample cost (benchlib.cpu),
printed per GiB moved: a steadier figure on a shared machine.  Every row shows
its spread, (max - min) / median; a goal relative to a row that moved more than
ANCHOR_DRIFT is not judged.
"""

import dataclasses
import statistics

ANCHOR_DRIFT = 0.2      # a reference row whose spread exceeds this judges no goal
GIB = 1 << 30


def spread(values):
    """(max - min) / median of the values that are not None; None without a median."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    median = statistics.median(values)
    if not median:
        return None
    return (max(values) - min(values)) / abs(median)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _per_run_ratios(samples, ref_samples):
    """sample i / reference sample i, or None when the runs do not pair up."""
    if len(samples) != len(ref_samples) or not samples:
        return None
    pairs = [(s, a) for s, a in zip(samples, ref_samples) if s is not None and a is not None]
    if len(pairs) != len(samples) or not all(a for _, a in pairs):
        return None
    return [s / a for s, a in pairs]


@dataclasses.dataclass
class Goal:
    """A target for a row: its ratio to the anchor (relative) or its median (absolute).

    at_least: the value must reach the limit (for rates such as IOPS) rather
    than stay under it (for times).  ref: divide by that row of the group
    instead of the anchor (e.g. "at least qemu-nbd's figure").
    """
    limit: float
    relative: bool = True
    strict: bool = False     # "<" rather than "<=" (">" rather than ">=" with at_least)
    at_least: bool = False
    ref: str = None

    def met(self, median, ratio):
        value = ratio if self.relative else median
        if value is None:
            return None
        if self.at_least:
            return value > self.limit if self.strict else value >= self.limit
        return value < self.limit if self.strict else value <= self.limit

    def text(self, unit):
        if self.at_least:
            op = ">" if self.strict else ">="
        else:
            op = "<" if self.strict else "<="
        if not self.relative:
            return "%s %g %s" % (op, self.limit, unit)
        return "%s %g%s" % (op, self.limit, "x " + self.ref if self.ref else "")


@dataclasses.dataclass
class Row:
    """One line of a table.  cpu_samples[i]: CPU seconds per GiB moved of samples[i]
    (None where sample i had no CPU reading)."""
    key: str
    label: str
    anchor: bool = False
    goal: Goal = None
    samples: list = dataclasses.field(default_factory=list)
    cpu_samples: list = dataclasses.field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.samples) if self.samples else None

    @property
    def spread(self):
        return spread(self.samples)

    @property
    def cpu_median(self):
        """CPU seconds per GiB, the median of the samples that have one."""
        return _median(self.cpu_samples)

    @property
    def has_cpu(self):
        return any(c is not None for c in self.cpu_samples)


class Group:
    """One table of a section; rows keep the order they were declared in."""

    def __init__(self, section, name, title, unit, data_bytes=None, refs=()):
        self.section = section
        self.name = name
        self.title = title
        self.unit = unit
        self.data_bytes = data_bytes    # bytes moved per sample: adds a MiB/s column
        self.refs = tuple(refs)         # more rows to divide by: one "/KEY" column each
        self.rows = {}

    def row(self, key, label, anchor=False, goal=None):
        if anchor and self.anchor is not None:
            raise ValueError("group %s has an anchor already" % self.name)
        self.rows[key] = Row(key, label, anchor, goal)
        return self.rows[key]

    def add(self, key, value, cpu=None, data=None):
        """One sample of row key.  cpu: the CPU seconds it cost (benchlib.cpu); data:
        the bytes it moved (default: the group's data_bytes), which cpu is divided by."""
        row = self.rows[key]
        per_gib = None
        if cpu is not None:
            data = data if data is not None else self.data_bytes
            if not data:
                raise ValueError("group %s: a CPU reading needs the bytes moved" % self.name)
            per_gib = cpu * GIB / data
        row.samples.append(value)
        row.cpu_samples.append(per_gib)

    @property
    def anchor(self):
        return next((r for r in self.rows.values() if r.anchor), None)

    @property
    def has_cpu(self):
        return any(r.has_cpu for r in self.rows.values())

    def _reference(self, ref):
        return self.rows.get(ref) if ref else self.anchor

    def ratios(self, row, ref=None):
        """Per-run ratios of the row to the anchor (or to row `ref`); None if runs do not pair."""
        anchor = self._reference(ref)
        if anchor is None:
            return None
        return _per_run_ratios(row.samples, anchor.samples)

    def ratio(self, row, ref=None):
        """The row relative to the anchor (or to row `ref`): the median of the per-run ratios.

        Sample i of every row comes from the same run, measured next to each
        other, so dividing within a run cancels the load drifts of a shared
        machine that a ratio of medians would keep.
        """
        anchor = self._reference(ref)
        if anchor is None or not anchor.samples or not row.samples:
            return None
        ratios = self.ratios(row, ref)
        if ratios is not None:
            return statistics.median(ratios)
        return row.median / anchor.median if anchor.median else None

    def ratio_spread(self, row):
        """Spread of the row's per-run ratios to the anchor (None for the anchor itself)."""
        if row.anchor:
            return None
        ratios = self.ratios(row)
        return spread(ratios) if ratios else None

    def cpu_ratio(self, row):
        """CPU per GiB relative to the anchor's: the median of the per-run ratios."""
        anchor = self.anchor
        if anchor is None or not row.has_cpu or not anchor.has_cpu:
            return None
        ratios = _per_run_ratios(row.cpu_samples, anchor.cpu_samples)
        if ratios is not None:
            return statistics.median(ratios)
        return row.cpu_median / anchor.cpu_median if anchor.cpu_median else None

    def rate(self, row):
        """MiB/s for the median sample (the unit is seconds when data_bytes is set)."""
        if not self.data_bytes or not row.median:
            return None
        return self.data_bytes / row.median / 2**20

    @property
    def anchor_spread(self):
        anchor = self.anchor
        return anchor.spread if anchor else None

    def drift(self, row):
        """The spread of the row that row's goal divides by, if it exceeds ANCHOR_DRIFT
        (the goal is then not judged); else None."""
        if not row.goal or not row.goal.relative:
            return None
        reference = self._reference(row.goal.ref)
        moved = reference.spread if reference is not None else None
        return moved if moved is not None and moved > ANCHOR_DRIFT else None

    def judged(self, row):
        """Whether the row's goal is judged: None without a goal, False if its anchor moved."""
        if not row.goal:
            return None
        return self.drift(row) is None

    def goal_met(self, row):
        if not row.goal or self.drift(row) is not None:
            return None
        return row.goal.met(row.median, self.ratio(row, row.goal.ref))

    def goal_text(self, row):
        if not row.goal:
            return ""
        text = row.goal.text(self.unit)
        moved = self.drift(row)
        if moved is not None:
            text += ", %s moved %.0f%%" % ("anchor" if not row.goal.ref else row.goal.ref,
                                           moved * 100)
        return text

    def to_json(self):
        rows = []
        for r in self.rows.values():
            rows.append({
                "key": r.key, "label": r.label, "anchor": r.anchor, "unit": self.unit,
                "samples": r.samples, "median": r.median,
                "min": min(r.samples) if r.samples else None,
                "max": max(r.samples) if r.samples else None,
                "spread": r.spread,
                "mib_per_s": self.rate(r), "ratio": self.ratio(r),
                "ratio_spread": self.ratio_spread(r),
                "ratios": {ref: self.ratio(r, ref) for ref in self.refs},
                "cpu_samples": r.cpu_samples if r.has_cpu else None,
                "cpu_s_per_gib": r.cpu_median, "cpu_ratio": self.cpu_ratio(r),
                "goal": self.goal_text(r) or None,
                "judged": self.judged(r),
                "goal_met": self.goal_met(r),
            })
        return {"section": self.section, "group": self.name, "title": self.title,
                "unit": self.unit, "data_bytes": self.data_bytes,
                "anchor_spread": self.anchor_spread, "anchor_drift_limit": ANCHOR_DRIFT,
                "rows": rows}


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return "%.3f" % value
    if unit == "IOPS":
        return "%.0f" % value
    return "%.1f" % value


def _pct(value):
    return "%.0f%%" % (value * 100) if value is not None else "-"


def _x(value):
    return "%.2f" % value if value is not None else "-"


def render(group):
    """The group as an aligned text table."""
    anchor = group.anchor
    cpu = group.has_cpu
    header = ["%s" % group.name, "median %s" % group.unit, "min", "max", "spread"]
    if group.data_bytes:
        header.append("MiB/s")
    if anchor:
        header += ["ratio", "r.spread"]
    header += ["/" + ref for ref in group.refs]
    if cpu:
        header.append("CPU s/GiB")
        if anchor:
            header.append("CPU ratio")
    header += ["goal", ""]
    lines = []
    for r in group.rows.values():
        label = r.label + (" (anchor)" if r.anchor else "")
        cells = [label, _fmt(r.median, group.unit),
                 _fmt(min(r.samples) if r.samples else None, group.unit),
                 _fmt(max(r.samples) if r.samples else None, group.unit),
                 _pct(r.spread)]
        if group.data_bytes:
            rate = group.rate(r)
            cells.append("%.0f" % rate if rate else "-")
        if anchor:
            cells += [_x(group.ratio(r)), _pct(group.ratio_spread(r))]
        for ref in group.refs:
            cells.append(_x(group.ratio(r, ref)))
        if cpu:
            cells.append("%.3f" % r.cpu_median if r.cpu_median is not None else "-")
            if anchor:
                cells.append(_x(group.cpu_ratio(r)))
        if r.goal:
            met = group.goal_met(r)
            cells += [group.goal_text(r), {True: "ok", False: "MISSED", None: "?"}[met]]
        else:
            cells += ["", ""]
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

    def line(cells):
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:-2], widths[1:-2])]
        out += [cells[-2].ljust(widths[-2]), cells[-1]]
        return "  ".join(out).rstrip()

    title = "== %s / %s: %s" % (group.section, group.name, group.title)
    return "\n".join([title, line(header)] + [line(c) for c in lines])


def missed_goals(groups):
    """(group, row) pairs whose goal was judged and not met."""
    out = []
    for g in groups:
        for r in g.rows.values():
            if g.goal_met(r) is False:
                out.append((g, r))
    return out


def unjudged_goals(groups):
    """(group, row) pairs whose goal was not judged: the row it divides by moved too much."""
    return [(g, r) for g in groups for r in g.rows.values() if g.judged(r) is False]
