"""What a section gets to run with: settings, a temporary folder, servers, result tables."""

import os
import subprocess
import sys
import time

from benchlib.cpu import CpuMeter
from benchlib.results import Group
from benchlib.servers import Servers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def human_size(n):
    """1073741824 -> "1 GiB" (exact binary units only, else bytes)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "%d %s" % (n >> shift, unit)
    return "%d bytes" % n


class CommandError(Exception):
    """A measured command failed; the message carries its stderr."""


class Bench:
    """Settings and shared state of one benchmark run.

    runs: samples per row (the tables print their median); size: bytes of the
    data the throughput benchmarks move; quick: a smoke run (sections may also
    shrink what they do); folder: the temporary folder, removed at the end;
    threads, io_seconds: options of section smallio (None: its defaults).
    """

    def __init__(self, folder, runs, size, quick, threads=None, io_seconds=None):
        self.folder = folder
        self.runs = runs
        self.size = size
        self.quick = quick
        self.threads = threads
        self.io_seconds = io_seconds
        self.servers = Servers(folder)
        self.groups = []
        self._names = set()

    def group(self, section, name, title, unit, data_bytes=None, refs=()):
        g = Group(section, name, title, unit, data_bytes, refs)
        self.groups.append(g)
        return g

    def path(self, name):
        """A new path in the temporary folder (name, or name.N if taken)."""
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = "%s.%d" % (name, n)
        self._names.add(candidate)
        return os.path.join(self.folder, candidate)

    def progress(self, message):
        sys.stderr.write("bench: %s\n" % message)
        sys.stderr.flush()

    def run(self, argv, env=None):
        """Run a command to completion; raise CommandError with its stderr if it fails."""
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env=env)
        if p.returncode != 0:
            raise CommandError("%s: exit status %d\n%s" % (
                " ".join(argv), p.returncode, p.stderr.decode(errors="replace").strip()))

    def timed(self, argv, env=None):
        """Seconds that a command takes, from exec to exit (it must succeed)."""
        os.sync()   # dirty pages of an earlier step must not be written back during this one
        start = time.perf_counter()
        self.run(argv, env=env)
        return time.perf_counter() - start

    def timed_cpu(self, argv, pids=(), env=None):
        """(seconds, CPU seconds) of a command that must succeed: the CPU of the command
        and of the servers `pids` (with their descendants) while it runs (benchlib.cpu)."""
        os.sync()
        meter = CpuMeter(pids).start()
        start = time.perf_counter()
        self.run(argv, env=env)
        seconds = time.perf_counter() - start
        return seconds, meter.stop()
