"""The named benchmark sections, in the order `scripts/bench` runs them.

A section is a module with TITLE (one line) and run(bench), which declares its
tables with bench.group(...) and adds one sample per run to each row.  To add a
benchmark, write such a module and list it here.
"""

from benchlib import (backup, bitmaps, ceph, commit, delta, durable, mirror, overlay, smallio,
                      stream, tls)

SECTIONS = {
    "overlay": overlay,
    "stream": stream,
    "mirror": mirror,
    "commit": commit,
    "delta": delta,
    "smallio": smallio,
    "durable": durable,
    "tls": tls,
    "bitmaps": bitmaps,
    "backup": backup,
    "ceph": ceph,
}
