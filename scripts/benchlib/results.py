"""Benchmark results: groups of rows of samples, medians, ratios to an anchor, goals.

A group is one table: rows measured the same way (e.g. "read 1 GiB with
nbdcopy"), one of which may be the anchor that the others are divided by.
Measurements on these machines are noisy, so only ratios to an anchor measured
in the same run are meant to be compared across machines and days.
"""

import dataclasses
import statistics


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
    key: str
    label: str
    anchor: bool = False
    goal: Goal = None
    samples: list = dataclasses.field(default_factory=list)

    @property
    def median(self):
        return statistics.median(self.samples) if self.samples else None


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

    def add(self, key, value):
        self.rows[key].samples.append(value)

    @property
    def anchor(self):
        return next((r for r in self.rows.values() if r.anchor), None)

    def ratio(self, row, ref=None):
        """The row relative to the anchor (or to row `ref`): the median of the per-run ratios.

        Sample i of every row comes from the same run, measured next to each
        other, so dividing within a run cancels the load drifts of a shared
        machine that a ratio of medians would keep.
        """
        anchor = self.rows.get(ref) if ref else self.anchor
        if anchor is None or not anchor.samples or not row.samples:
            return None
        if len(anchor.samples) == len(row.samples) and all(anchor.samples):
            return statistics.median(s / a for s, a in zip(row.samples, anchor.samples))
        return row.median / anchor.median if anchor.median else None

    def rate(self, row):
        """MiB/s for the median sample (the unit is seconds when data_bytes is set)."""
        if not self.data_bytes or not row.median:
            return None
        return self.data_bytes / row.median / 2**20

    def goal_met(self, row):
        if not row.goal:
            return None
        return row.goal.met(row.median, self.ratio(row, row.goal.ref))

    def to_json(self):
        rows = []
        for r in self.rows.values():
            ratio = self.ratio(r)
            rows.append({
                "key": r.key, "label": r.label, "anchor": r.anchor, "unit": self.unit,
                "samples": r.samples, "median": r.median,
                "min": min(r.samples) if r.samples else None,
                "max": max(r.samples) if r.samples else None,
                "mib_per_s": self.rate(r), "ratio": ratio,
                "ratios": {ref: self.ratio(r, ref) for ref in self.refs},
                "goal": r.goal.text(self.unit) if r.goal else None,
                "goal_met": self.goal_met(r),
            })
        return {"section": self.section, "group": self.name, "title": self.title,
                "unit": self.unit, "data_bytes": self.data_bytes, "rows": rows}


def _fmt(value, unit):
    if value is None:
        return "-"
    if unit == "s":
        return "%.3f" % value
    if unit == "IOPS":
        return "%.0f" % value
    return "%.1f" % value


def render(group):
    """The group as an aligned text table."""
    anchor = group.anchor
    header = ["%s" % group.name, "median %s" % group.unit, "min", "max"]
    if group.data_bytes:
        header.append("MiB/s")
    if anchor:
        header.append("ratio")
    header += ["/" + ref for ref in group.refs]
    header += ["goal", ""]
    lines = []
    for r in group.rows.values():
        ratio = group.ratio(r)
        label = r.label + (" (anchor)" if r.anchor else "")
        cells = [label, _fmt(r.median, group.unit),
                 _fmt(min(r.samples) if r.samples else None, group.unit),
                 _fmt(max(r.samples) if r.samples else None, group.unit)]
        if group.data_bytes:
            rate = group.rate(r)
            cells.append("%.0f" % rate if rate else "-")
        if anchor:
            cells.append("%.2f" % ratio if ratio is not None else "-")
        for ref in group.refs:
            other = group.ratio(r, ref)
            cells.append("%.2f" % other if other is not None else "-")
        if r.goal:
            met = group.goal_met(r)
            cells += [r.goal.text(group.unit), {True: "ok", False: "MISSED", None: "?"}[met]]
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
    """(group, row) pairs whose goal was not met."""
    out = []
    for g in groups:
        for r in g.rows.values():
            if g.goal_met(r) is False:
                out.append((g, r))
    return out
