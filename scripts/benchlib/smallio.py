"""Section "smallio": guest-sized random I/O (fio, nbd engine): IOPS and p99 latency.

A guest does 4K-64K random requests at queue depths up to 32, not 256K
sequential copies.  Every row serves the same disk (--size bytes, default
1 GiB, made once from /dev/urandom and page-cached) and is driven by fio's
nbd engine (`--ioengine=nbd --uri=nbd+unix:///?socket=S`), one fio job of
--io-seconds (default 1 s) per workload and row:

    randread/randwrite 4K at QD1 (iodepth=1, numjobs=1), 4K at QD32x2
    (iodepth=32, numjobs=2: two NBD connections, up to 64 requests in flight,
    as in issue 14's table), and 64K at QD8 (iodepth=8, numjobs=1).

Rows (every Python plugin under the same `nbdkit --threads T`, option
--threads; the C servers at their defaults):

    null      nbdkit null (C): no data at all, the NBD round trip and fio's own cost
    file      nbdkit file (C) on a page-cached copy of the base
    qemu      qemu-nbd -e 8, a fresh qcow2 overlay on the base per fio invocation
    noop      a Python plugin whose pread/pwrite do nothing (the ceiling)
    naive     a Python plugin doing one os.preadv/os.pwritev on the copy (the anchor)
    ours-empty  plugin/overlaydisk.py, a fresh empty overlay on the base per invocation
    ours-full   the same with every cluster in the overlay (filled once with nbdcopy)
    ours-cache  nbdkit's C cache filter (cache-on-read=true, cache=writethrough) in
                front of ours-full, warm: the whole disk was read through it first

One fio invocation per workload runs it against every row in turn (one
stonewalled fio job per server; fio itself takes ~0.4 s to start).  The
servers whose state does not change in a way that matters stay up for the
whole section (null, file, noop, naive, ours-full, and ours-cache, whose cache
must stay warm); qemu and ours-empty get a fresh overlay and server per
invocation, so every write run starts on an empty overlay.  Writes are not
flushed (no fsync in the fio jobs: a guest with a writeback cache); `sync` runs
before each invocation.  Besides IOPS and p99 completion latency (fio's clat),
the section reads each server's CPU time (utime+stime of the process, from
/proc/PID/stat) around the invocation, while fio drives the others that server
is idle: server CPU microseconds per request.  The IOPS tables add that CPU
plus fio's own for the row (its report's usr_cpu + sys_cpu of the job) per
GiB moved (requests x block size).

--quick: one run (not --runs), 0.2 s per fio job, on a 64 MiB disk.

With several --threads values (e.g. --threads 1,2,4,8,16) the section sweeps
them instead, for the naive plugin and ours (empty and full) on the 4K
workloads: one table per workload and thread count, anchor the naive plugin
under the same thread count.

Ratios: to the naive plugin (the anchor, where the goals are) and to the
no-op ceiling ("/noop" column).  Rows are interleaved and rotated per run and
workload.  `python -m benchlib.smallio RESULTS.json` prints the IOPS and
latency of a result file as one markdown table (benchlib.smallio_report).
"""

import dataclasses
import os
import shutil

from benchlib.bench import REPO, human_size
from benchlib.cpu import CpuMeter
from benchlib.fio import fio
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal

TITLE = "fio 4K/64K random I/O over NBD: IOPS, p99 latency, CPU per request"
SECTION = "smallio"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
DEFAULT_THREADS = 2
IO_SECONDS = 1.0
QUICK_IO_SECONDS = 0.2
CHUNK = 4 << 20
FRESH_WRITE_MEMORY = 3 << 29   # recycle_memory() before a fresh overlay's write row

# The ceiling of nbdkit's Python plugin: a request that does no work at all.
# pread leaves nbdkit's buffer as it is (whatever it held), pwrite drops the data.
NOOP_PLUGIN = '''\
import nbdkit
API_VERSION = 2
size = 1 << 30
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def config(key, value):
    global size
    size = int(value)
def open(readonly):
    return 1
def get_size(h):
    return size
def can_multi_conn(h):
    return True
def pread(h, buf, offset, flags):
    pass
def pwrite(h, buf, offset, flags):
    pass
def flush(h, flags):
    pass
'''

# The least a Python plugin can do per request: one preadv/pwritev on a file.
NAIVE_PLUGIN = '''\
import os
import nbdkit
API_VERSION = 2
fd = None
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def config(key, value):
    global fd
    fd = os.open(value, os.O_RDWR)
def open(readonly):
    return 1
def get_size(h):
    return os.fstat(fd).st_size
def can_multi_conn(h):
    return True
def pread(h, buf, offset, flags):
    os.preadv(fd, [buf], offset)
def pwrite(h, buf, offset, flags):
    os.pwritev(fd, [buf], offset)
def flush(h, flags):
    os.fdatasync(fd)
'''


@dataclasses.dataclass
class Workload:
    key: str
    rw: str          # fio rw=
    bs: int
    iodepth: int
    numjobs: int

    @property
    def op(self):
        """The key of fio's JSON that holds the numbers: read or write."""
        return "write" if "write" in self.rw else "read"

    @property
    def title(self):
        qd = "QD%d" % self.iodepth + ("x%d" % self.numjobs if self.numjobs > 1 else "")
        return "fio %s %s %s (iodepth=%d numjobs=%d)" % (
            self.rw, human_size(self.bs).replace(" ", ""), qd, self.iodepth, self.numjobs)


WORKLOADS = [
    Workload("randread-4k-qd1", "randread", 4096, 1, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32, 2),
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32, 2),
    Workload("randread-64k-qd8", "randread", 65536, 8, 1),
    Workload("randwrite-64k-qd8", "randwrite", 65536, 8, 1),
]
CPU_WORKLOADS = {w.key for w in WORKLOADS if w.bs == 4096}
SWEEP_WORKLOADS = [w for w in WORKLOADS if w.bs == 4096]

# Issue 14's goals, against the naive plugin under the same --threads.
GOALS = {
    ("randread-4k-qd32", "ours-empty"): Goal(0.95, at_least=True),
    ("randread-4k-qd32", "ours-full"): Goal(0.95, at_least=True),
    ("randread-4k-qd1", "ours-empty"): Goal(0.9, at_least=True),
    ("randread-4k-qd1", "ours-full"): Goal(0.9, at_least=True),
    ("randwrite-4k-qd32", "ours-full"): Goal(0.95, at_least=True),
    ("randwrite-4k-qd1", "ours-full"): Goal(0.9, at_least=True),
    # Copy-on-write of a partial cluster: at least qemu-nbd's qcow2 (also 64K clusters).
    ("randwrite-4k-qd1", "ours-empty"): Goal(1.0, at_least=True, ref="qemu"),
}


@dataclasses.dataclass
class Target:
    """A row: how to start its server.  start() -> (server, paths to remove after the batch).

    persistent: started on first use and kept for the whole section (its state
    does not change in a way that matters: a full overlay, the warm cache, the
    stateless servers); else a new server (a fresh overlay) per fio invocation.
    """
    key: str
    label: str
    start: object
    persistent: bool = False
    server: object = None


class Files:
    """The section's data: the base, a writable copy, the no-op and naive plugins."""

    def __init__(self, bench):
        self.bench = bench
        self.base = make_base(bench)
        self.work = bench.path("work.img")
        bench.progress("smallio: copying the base for the file and naive rows")
        shutil.copyfile(self.base, self.work)
        with open(self.work, "rb+") as f:
            os.fsync(f.fileno())
        _read_all(self.work)
        self.noop = bench.path("noop_plugin.py")
        self.naive = bench.path("naive_plugin.py")
        for path, text in ((self.noop, NOOP_PLUGIN), (self.naive, NAIVE_PLUGIN)):
            with open(path, "w") as f:
                f.write(text)


def _read_all(path):
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _ours(bench, files, name, state, threads, filters=(), params=(), env=None):
    return bench.servers.nbdkit(name, "--threads", str(threads), *filters, "python", PLUGIN,
                                "overlay=" + state, "base=" + files.base, *params, env=env)


def _fill(bench, files, server):
    """Write the whole base into an overlay: every cluster allocated."""
    bench.run(["nbdcopy", files.base, server.uri])


def targets(bench, files, threads):
    """The rows of one --threads value (not a sweep)."""
    t = str(threads)
    sv = bench.servers
    full = bench.path("state-full")
    bench.progress("smallio: filling an overlay with every cluster (nbdcopy, not timed)")
    server = _ours(bench, files, "ours-full", full, threads)
    _fill(bench, files, server)
    sv.stop(server)

    def qemu():
        path = bench.path("overlay.qcow2")
        bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", files.base, "-F", "raw", path])
        # -e 8: with qemu-nbd's default of one client, fio's second job (numjobs=2)
        # waits for the first to disconnect, the two run one after the other,
        # and group_reporting adds their IOPS up: twice the real figure.
        return sv.qemu_nbd("qemu-nbd", path, "qcow2", shared=8), [path]

    def ours_empty():
        state = bench.path("state-empty")
        return _ours(bench, files, "ours-empty", state, threads), [state]

    def ours_cache():
        state = bench.path("state-cache")
        tmp = bench.path("cache-tmp")
        os.mkdir(tmp)
        server = _ours(bench, files, "ours-cache", state, threads, filters=["--filter=cache"],
                       params=["cache=writethrough", "cache-on-read=true",
                               "cache-max-size=%d" % (bench.size * 5 // 4)],
                       env=dict(os.environ, TMPDIR=tmp))
        bench.progress("smallio: filling the cache row's overlay through the filter, "
                       "then reading it all once (warm cache; not timed)")
        _fill(bench, files, server)
        bench.run(["nbdcopy", server.uri, "null:"])
        return server, []

    return [
        Target("null", "nbdkit null (C): no data, the NBD + fio floor",
               lambda: (sv.nbdkit("null", "null", "size=%d" % bench.size), []), True),
        Target("file", "nbdkit file (C), page-cached copy of the base",
               lambda: (sv.nbdkit("file", "file", files.work), []), True),
        Target("qemu", "qemu-nbd, fresh qcow2 overlay on base", qemu),
        Target("noop", "no-op Python plugin (the ceiling)",
               lambda: (sv.nbdkit("noop", "--threads", t, "python", files.noop,
                                  "size=%d" % bench.size), []), True),
        Target("naive", "naive Python plugin: one preadv/pwritev",
               lambda: (sv.nbdkit("naive", "--threads", t, "python", files.naive,
                                  "file=" + files.work), []), True),
        Target("ours-empty", "ours, fresh empty overlay on base", ours_empty),
        Target("ours-full", "ours, every cluster in the overlay",
               lambda: (_ours(bench, files, "ours-full", full, threads), []), True),
        Target("ours-cache", "EXTRA: cache filter (C, warm) + ours-full", ours_cache,
               persistent=True),
    ]


def sweep_targets(bench, files, threads_list):
    """naive, ours-empty and ours-full under each --threads value: {threads: [Target]}."""
    sv = bench.servers
    full = bench.path("state-full")
    bench.progress("smallio: filling an overlay with every cluster (nbdcopy, not timed)")
    server = _ours(bench, files, "ours-full", full, threads_list[0])
    _fill(bench, files, server)
    sv.stop(server)
    out = {}
    for threads in threads_list:
        def ours_empty(threads=threads):
            state = bench.path("state-empty")
            return _ours(bench, files, "ours-empty", state, threads), [state]
        out[threads] = [
            Target("naive", "naive Python plugin: one preadv/pwritev",
                   lambda threads=threads: (sv.nbdkit("naive", "--threads", str(threads), "python",
                                                      files.naive, "file=" + files.work), []),
                   True),
            Target("ours-empty", "ours, fresh empty overlay on base", ours_empty),
            Target("ours-full", "ours, every cluster in the overlay",
                   lambda threads=threads: (_ours(bench, files, "ours-full", full, threads), [])),
        ]
    return out


def measure(bench, targets_in_order, workload, seconds):
    """Run the workload against every target, in this order, in one fio invocation.

    Persistent targets keep their server (started on first use); the others get
    a new one (a fresh overlay) for this batch, stopped after it.  The server
    CPU time is read around the whole invocation: a server is idle while fio
    drives the others.  Returns {key: (IOPS, p99 us, server CPU us per request,
    CPU seconds of the server and of fio's job, bytes moved)}.
    """
    started = []
    try:
        servers = {}
        for target in targets_in_order:
            if target.persistent:
                if target.server is None:
                    target.server, _ = target.start()
                servers[target.key] = target.server
            else:
                server, paths = target.start()
                started.append((server, paths))
                servers[target.key] = server
        jobs = [(t.key, servers[t.key].uri) for t in targets_in_order]
        # A write job leaves up to a disk's worth of dirty pages, which the kernel
        # writes back (flusher threads, the same 2 cores and disk) during the jobs
        # that follow it in one invocation: so writes get an invocation per row,
        # each after a sync.  Reads share one (fio's start costs ~0.4 s).
        batches = [[job] for job in jobs] if "write" in workload.rw else [jobs]
        fresh = {t.key for t in targets_in_order if not t.persistent}
        out = {}
        for batch in batches:
            os.sync()   # no writeback of an earlier batch's dirty pages during this one
            if len(batch) == 1 and batch[0][0] in fresh:
                recycle_memory(FRESH_WRITE_MEMORY)
            # clients=False: fio's CPU is in its report, per job.
            meters = {key: CpuMeter([servers[key].pid], clients=False).start()
                      for key, _ in batch}
            measured = fio(bench, workload, batch, seconds)
            for key, (iops, p99, requests, fio_cpu) in measured.items():
                cpu = meters[key].stop()
                out[key] = (iops, p99, cpu / requests * 1e6, cpu + fio_cpu,
                            requests * workload.bs)
        return out
    finally:
        for server, paths in started:
            bench.servers.stop(server)
            for path in paths:
                _remove(path)


def recycle_memory(nbytes):
    """Touch nbytes of anonymous memory and give it back, just before a row that
    writes into fresh page cache (qemu's and our fresh overlays).

    This VM (Firecracker, virtio-balloon free page reporting) hands free memory
    back to the host a moment after it is freed; the next process to get such
    a page pays a host fault on first touch (about 4.5 us per 4K page here,
    1.2 s per GiB).  A row that writes 64K into fresh clusters for a second
    allocates about 1 GiB of page cache: measured after idle batches, qemu-nbd
    and ours both fell from 17-22k to about 6k IOPS and 4x the CPU per request,
    while the row that ran first in an invocation (just after the last
    invocation's overlays were deleted) did not.  Pages freed here are back in
    the guest's free lists for the next couple of seconds, so every fresh row
    starts with the same memory, whatever ran before it (docs/benchmarks.md).
    """
    import mmap
    chunk = b"\1" * (1 << 20)
    with mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
        for offset in range(0, nbytes, len(chunk)):
            m[offset:offset + len(chunk)] = chunk


def _groups(bench, workload, rows, suffix="", title_suffix="", latency=True, cpu=True):
    """IOPS, p99 and CPU tables of one workload, rows declared in order."""
    made = []
    iops = bench.group(SECTION, workload.key + suffix, workload.title + title_suffix + ": IOPS",
                       "IOPS", refs=["noop"] if "noop" in rows else [])
    made.append(("iops", iops))
    if latency:
        made.append(("p99", bench.group(
            SECTION, workload.key + suffix + "-p99",
            workload.title + title_suffix + ": p99 completion latency (lower is better)", "us",
            refs=["noop"] if "noop" in rows else [])))
    if cpu:
        made.append(("cpu", bench.group(
            SECTION, workload.key + suffix + "-cpu",
            workload.title + title_suffix + ": server CPU per request (utime+stime)", "us",
            refs=["noop"] if "noop" in rows else [])))
    for kind, group in made:
        for key, label in rows.items():
            goal = GOALS.get((workload.key, key)) if kind == "iops" else None
            group.row(key, label, anchor=(key == "naive"), goal=goal)
    return dict(made)


def run(bench):
    threads_list = bench.threads or [DEFAULT_THREADS]
    seconds = bench.io_seconds or (QUICK_IO_SECONDS if bench.quick else IO_SECONDS)
    # A smoke run measures everything once: fio needs ~0.26 s per job on top of
    # its runtime (it polls its jobs every 100 ms), so 3 runs would take 90 s.
    runs = 1 if bench.quick else bench.runs
    files = Files(bench)
    if len(threads_list) > 1:
        return sweep(bench, files, threads_list, seconds, runs)
    threads = threads_list[0]
    rows = targets(bench, files, threads)
    labels = {t.key: t.label for t in rows}
    tables = {w.key: _groups(bench, w, labels, title_suffix=", Python plugins --threads %d"
                             % threads, cpu=w.key in CPU_WORKLOADS)
              for w in WORKLOADS}
    for target in rows:
        if target.persistent:
            target.server, _ = target.start()
    for i in range(runs):
        bench.progress("smallio: run %d/%d (%d fio runs of %gs)" % (
            i + 1, runs, len(WORKLOADS) * len(rows), seconds))
        for n, workload in enumerate(WORKLOADS):
            t = tables[workload.key]
            for key, (iops, p99, cpu, total, data) in measure(
                    bench, rotated(rows, i + n), workload, seconds).items():
                t["iops"].add(key, iops, cpu=total, data=data)
                t["p99"].add(key, p99)
                if "cpu" in t:
                    t["cpu"].add(key, cpu)
    for target in rows:
        if target.server is not None:
            bench.servers.stop(target.server)
            target.server = None


def sweep(bench, files, threads_list, seconds, runs):
    by_threads = sweep_targets(bench, files, threads_list)
    tables = {}
    for workload in SWEEP_WORKLOADS:
        for threads, rows in by_threads.items():
            labels = {t.key: t.label for t in rows}
            tables[workload.key, threads] = _groups(
                bench, workload, labels, suffix="-t%d" % threads,
                title_suffix=", nbdkit --threads %d" % threads, latency=False)
    # One fio invocation per workload and thread count (ours-full of every
    # thread count shares one overlay, so only one of them runs at a time).
    count = sum(len(rows) for rows in by_threads.values()) * len(SWEEP_WORKLOADS)
    for i in range(runs):
        bench.progress("smallio: sweep run %d/%d (%d fio runs of %gs)" % (
            i + 1, runs, count, seconds))
        for n, workload in enumerate(SWEEP_WORKLOADS):
            for m, threads in enumerate(rotated(list(by_threads), i + n)):
                rows = rotated(by_threads[threads], i + n + m)
                t = tables[workload.key, threads]
                for key, (iops, _, cpu, total, data) in measure(bench, rows, workload,
                                                                seconds).items():
                    t["iops"].add(key, iops, cpu=total, data=data)
                    t["cpu"].add(key, cpu)
    for rows in by_threads.values():
        for target in rows:
            if target.server is not None:
                bench.servers.stop(target.server)
                target.server = None


if __name__ == "__main__":
    from benchlib.smallio_report import main
    main()
