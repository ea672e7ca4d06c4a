"""Section smallio's result files as markdown (for docs/benchmarks.md).

`python -m benchlib.smallio_report RESULTS.json` (or `-m benchlib.smallio`)
prints the IOPS and latency of a result file as one markdown table, or a
--threads sweep's IOPS and server CPU per request.
"""

import json
import re
import sys

from benchlib.smallio import SECTION, SWEEP_WORKLOADS, WORKLOADS


def sweep_markdown(result, groups):
    """A sweep's IOPS (ratio to naive) and server CPU us per request: rows x workloads."""
    keys = [w.key for w in SWEEP_WORKLOADS]
    threads = sorted({int(m.group(2)) for m in map(re.compile(r"^(.*)-t(\d+)$").match, groups)
                      if m and m.group(1) in keys})
    lines = ["| row | --threads | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for key in ("naive", "ours-empty", "ours-full"):
        for t in threads:
            cells = []
            for w in keys:
                iops = next(r for r in groups["%s-t%d" % (w, t)]["rows"] if r["key"] == key)
                cpu_group = groups.get("%s-t%d-cpu" % (w, t))
                cpu = next(r for r in cpu_group["rows"] if r["key"] == key) if cpu_group else None
                text = "%.1fk" % (iops["median"] / 1000)
                if not iops["anchor"]:
                    text += " (%.2f)" % iops["ratio"]
                if cpu:
                    text += ", %.0f us CPU" % cpu["median"]
                cells.append(text)
            lines.append("| %s | %d | %s |" % (key, t, " | ".join(cells)))
    return "\n".join(lines)


def markdown(result):
    """The IOPS (and p99) tables of a result file as one markdown table: rows x workloads."""
    groups = {g["group"]: g for g in result["groups"] if g["section"] == SECTION}
    keys = [w.key for w in WORKLOADS if w.key in groups]
    if not keys and groups:
        return sweep_markdown(result, groups)
    if not keys:
        return "no smallio results"
    heads = [groups[k]["title"].split(" (")[0].replace("fio ", "") for k in keys]
    lines = ["| server | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(keys)]
    for row in groups[keys[0]]["rows"]:
        cells = []
        for k in keys:
            r = next(x for x in groups[k]["rows"] if x["key"] == row["key"])
            p99 = groups.get(k + "-p99")
            lat = next((x["median"] for x in p99["rows"] if x["key"] == row["key"]), None) \
                if p99 else None
            text = "%.1fk" % (r["median"] / 1000)
            if r["ratio"] is not None and not r["anchor"]:
                text += " (%.2f)" % r["ratio"]
            if lat is not None:
                text += ", %.0f us" % lat
            cells.append(text)
        lines.append("| %s | %s |" % (row["label"], " | ".join(cells)))
    return "\n".join(lines)



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m benchlib.smallio_report RESULTS.json")
    with open(argv[0]) as f:
        print(markdown(json.load(f)))


if __name__ == "__main__":
    main()
