"""CPU time that a benchmark sample cost, beside its wall time.

Wall time swings on a shared machine; the CPU seconds a piece of work takes
move much less (issue 26).  A CpuMeter reads, at start() and at stop():

- the servers it was given (pids) and all their descendants: utime + stime
  + cutime + cstime from /proc/PID/stat, which covers every thread and the
  children each of them waited for;
- with clients=True, this process's RUSAGE_CHILDREN: the children the
  benchmark ran and waited for in between (nbdcopy, fio, qemu-io ... started
  by Bench.run), and a measured server that exits and is waited for during
  the interval (its whole life lands there; its start reading is subtracted).

Not counted: kernel threads working for them (page-cache writeback by the
flusher threads, for instance), a descendant whose parent never waits for it,
and anything this process itself spends (the QMP client, os.sync()).
The counters tick at SC_CLK_TCK (100 Hz here): 10 ms per server reading.
"""

import os
import resource

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (fields[0] is the state)."""
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def process_seconds(pid):
    """utime + stime + cutime + cstime of pid, in seconds; None if it is gone."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return sum(int(v) for v in fields[11:15]) / TICK


def _children_files(pid):
    """pid's children from /proc/PID/task/*/children; None if the kernel has no such file."""
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except (FileNotFoundError, ProcessLookupError):
        return []
    out = []
    for tid in tasks:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            if not os.path.exists("/proc/%d/task/%s" % (pid, tid)):
                continue        # the thread exited meanwhile
            return None         # CONFIG_PROC_CHILDREN is off
    return out


def _parents():
    """{pid: parent pid} of every process, from /proc/*/stat."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out[int(name)] = int(_stat_fields(int(name))[1])
            except (OSError, IndexError, ValueError):
                pass            # gone meanwhile
    return out


def descendants(pids):
    """pids and every live descendant of them (a set)."""
    found = set(pids)
    todo = list(pids)
    parents = None
    while todo:
        pid = todo.pop()
        children = None if parents is not None else _children_files(pid)
        if children is None:
            if parents is None:     # no children files: one scan of /proc for everyone
                parents = _parents()
            children = [c for c, p in parents.items() if p == pid]
        for child in children:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _reaped_children_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of servers (pids, with descendants) and, with clients=True, of the
    children this process waits for, between start() and stop().

    A measured pid that exits during the interval must be a child of this
    process that is waited for before stop(), with clients=True; else stop()
    raises (its last CPU seconds would be lost).
    """

    def __init__(self, pids=(), clients=True):
        self.pids = list(pids)
        self.clients = clients
        self.seconds = None
        self._start = None
        self._roots = None

    def _reading(self):
        tree = descendants(self.pids)
        total = 0.0
        live = set()
        for pid in tree:
            seconds = process_seconds(pid)
            if seconds is not None:
                total += seconds
                live.add(pid)
        if self.clients:
            total += _reaped_children_seconds()
        return total, live

    def start(self):
        self.seconds = None
        self._start, live = self._reading()
        self._roots = live & set(self.pids)
        return self

    def stop(self):
        """The CPU seconds since start() (also kept in .seconds)."""
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() without start()")
        end, live = self._reading()
        gone = self._roots - live
        if gone and not self.clients:
            raise RuntimeError("CpuMeter: pid %s exited during the measurement"
                               % ", ".join(map(str, sorted(gone))))
        self.seconds = max(0.0, end - self._start)
        self._start = None
        return self.seconds
