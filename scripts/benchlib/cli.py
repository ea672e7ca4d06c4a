"""scripts/bench command line: pick sections, run them, print tables, write JSON."""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import smallio
from benchlib.bench import Bench, REPO, human_size
from benchlib.results import ANCHOR_DRIFT, missed_goals, render, unjudged_goals
from benchlib.sections import SECTIONS

QUICK_SIZE = 64 << 20
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text):
    """1073741824, 64K, 512M, 1G, 1GiB (binary units)."""
    m = re.match(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", text, re.IGNORECASE)
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError("not a size: %r (use e.g. 64M, 1G)" % text)
    return int(m.group(1)) << (10 * _UNITS[m.group(2).upper()])


def parse_runs(text):
    n = int(text)
    if n < 3:
        raise argparse.ArgumentTypeError("at least 3 runs (the tables print medians)")
    return n


def parse_threads(text):
    """"4" or "1,2,4,8,16": nbdkit --threads values (several: a sweep)."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            "not a thread count or list: %r (use e.g. 4 or 1,2,4,8,16)" % text)
    return values


def parse_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0.1 <= value <= 600:
        raise argparse.ArgumentTypeError("not a duration from 0.1 to 600 s: %r" % text)
    return value


def build_parser():
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmarks. Prints medians and ratios to anchors measured in the same run.",
        epilog="sections: " + ", ".join("%s (%s)" % (k, m.TITLE) for k, m in SECTIONS.items()))
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help="sections to run (default: all)")
    p.add_argument("--runs", type=parse_runs, default=3, help="samples per row (default 3)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="data moved by throughput benchmarks (default 1G; 64M with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run with small sizes")
    p.add_argument("--json", metavar="PATH", help="result file (default: a new file in $TMPDIR)")
    p.add_argument("--threads", type=parse_threads, metavar="N[,N...]",
                   help="smallio: nbdkit --threads of every Python plugin (default %d); "
                        "several values (1,2,4,8,16) sweep them for the naive plugin and ours"
                        % smallio.DEFAULT_THREADS)
    p.add_argument("--io-seconds", type=parse_seconds, metavar="S",
                   help="smallio: seconds of each fio run (default %g; %g with --quick)"
                        % (smallio.IO_SECONDS, smallio.QUICK_IO_SECONDS))
    p.add_argument("--tmpdir", metavar="DIR",
                   help="parent of the temporary folder (default $TMPDIR or /tmp); "
                        "it should be a real disk, not tmpfs")
    return p


def machine_info():
    """Where and with what the numbers were measured."""
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return None

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(l for l in f if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(), "cpu_model": cpu, "memory_bytes": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "qemu_nbd": first_line(["qemu-nbd", "--version"]),
        "fio": first_line(["fio", "--version"]),
        "commit": first_line(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
    }


def load_average():
    """1-minute load average: other work on the machine shows up in the numbers."""
    return round(os.getloadavg()[0], 2)


def _terminate(signum, frame):
    # Turn SIGTERM/SIGHUP into an exception so the cleanup in main() runs.
    raise KeyboardInterrupt


def main(argv=None):
    args = build_parser().parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        sys.stderr.write("scripts/bench: unknown section(s): %s (known: %s)\n"
                         % (", ".join(unknown), ", ".join(SECTIONS)))
        return 2
    names = args.sections or list(SECTIONS)
    size = args.size or (QUICK_SIZE if args.quick else 1 << 30)
    started = datetime.datetime.now().astimezone()
    json_path = args.json or os.path.join(
        tempfile.gettempdir(), "overlay-bench-%s.json" % started.strftime("%Y%m%d-%H%M%S"))

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    folder = tempfile.mkdtemp(prefix="bench-", dir=args.tmpdir)
    bench = Bench(folder, args.runs, size, args.quick, threads=args.threads,
                  io_seconds=args.io_seconds)
    t0 = time.monotonic()
    load_start = load_average()
    try:
        bench.progress("folder=%s runs=%d size=%s%s" % (
            folder, args.runs, human_size(size), " quick" if args.quick else ""))
        for name in names:
            bench.progress("section %s: %s" % (name, SECTIONS[name].TITLE))
            SECTIONS[name].run(bench)
    except KeyboardInterrupt:
        sys.stderr.write("scripts/bench: interrupted\n")
        return 130
    except Exception as e:
        sys.stderr.write("scripts/bench: failed: %s\n" % e)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # a second Ctrl-C must not cut the cleanup short
        bench.servers.stop_all()
        shutil.rmtree(folder, ignore_errors=True)

    elapsed = time.monotonic() - t0
    load_end = load_average()
    machine = machine_info()
    print("date: %s  machine: %d cores, %s  commit: %s" % (
        started.strftime("%Y-%m-%d %H:%M %Z"), os.cpu_count(),
        machine["cpu_model"] or platform.machine(), machine["commit"]))
    print("runs: %d (median shown)  size: %s%s  elapsed: %.0fs  load average: %s at start, %s at end" % (
        args.runs, human_size(size), "  QUICK (smoke run)" if args.quick else "", elapsed,
        load_start, load_end))
    for g in bench.groups:
        print()
        print(render(g))
    missed = missed_goals(bench.groups)
    print()
    unjudged = unjudged_goals(bench.groups)
    if missed:
        print("goals missed: " + "; ".join("%s/%s: %s" % (g.name, r.key, r.label) for g, r in missed))
    else:
        print("all %sgoals met" % ("judged " if unjudged else ""))
    if unjudged:
        print("goals not judged (the row they divide by moved more than %.0f%%): " % (
            ANCHOR_DRIFT * 100) + "; ".join("%s/%s (%s)" % (g.name, r.key, g.goal_text(r))
                                           for g, r in unjudged))

    result = {
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "load_average": {"start": load_start, "end": load_end},
        "machine": machine,
        "settings": {"sections": names, "runs": args.runs, "size": size, "quick": args.quick,
                     "threads": args.threads, "io_seconds": args.io_seconds},
        "groups": [g.to_json() for g in bench.groups],
    }
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print("results: %s" % json_path)
    return 0
