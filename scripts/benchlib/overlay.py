"""Section "overlay": the overlay disk against nbdkit's file plugin, qemu-nbd and the cow filter.

Tables (all on one random base of --size bytes, made once and page-cached):
- read:    `nbdcopy URI null:`; anchor: nbdkit's file plugin serving the base.
- write:   `nbdcopy base.img URI` into a fresh target per run (includes the
           final flush); anchor: the file plugin on a fresh sparse file.
- memory:  peak RSS (VmHWM) of our nbdkit process serving a 1 TiB sparse
           disk after spread writes and `nbdinfo --map`.
- startup: exec of nbdkit -> `nbdinfo --size` succeeds, for a fresh 1 TiB
           overlay and for re-opening it; anchor: a trivial Python plugin.
Rows are measured interleaved (run 1 of every row, then run 2...), in a
rotating order, so slow drifts of a noisy machine hit every row alike.  read
and write add the CPU time of the server and of nbdcopy per GiB.
"""

import os
import shutil

import nbd

from benchlib.bench import REPO, human_size
from benchlib.results import Goal

TITLE = "overlay disk vs nbdkit file plugin, qemu-nbd + qcow2, nbdkit cow filter"
SECTION = "overlay"
PLUGIN = os.path.join(REPO, "plugin", "overlaydisk.py")
BIG = 1 << 40
CHUNK = 4 << 20

READ_GOAL = Goal(1.15)
WRITE_GOAL = Goal(1.3)
RSS_GOAL = Goal(100, relative=False, strict=True)

# A Python plugin that does nothing: what embedding Python costs at start-up.
TRIVIAL_PLUGIN = '''\
import nbdkit
API_VERSION = 2
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def open(readonly):
    return 1
def get_size(h):
    return 1 << 40
def pread(h, buf, offset, flags):
    buf[:] = bytes(len(buf))
'''

# The least a Python plugin can do per read: one preadv on the base.  Its
# ratio to the file plugin is the floor that nbdkit's Python glue sets.
NAIVE_PLUGIN = '''\
import os
import nbdkit
API_VERSION = 2
fd = None
def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL
def config(key, value):
    global fd
    fd = os.open(value, os.O_RDONLY)
def open(readonly):
    return 1
def get_size(h):
    return os.fstat(fd).st_size
def can_multi_conn(h):
    return True
def pread(h, buf, offset, flags):
    os.preadv(fd, [buf], offset)
'''


def run(bench):
    size_text = human_size(bench.size)
    read = bench.group(SECTION, "read", "nbdcopy NBD -> null:, %s" % size_text, "s", bench.size)
    write = bench.group(SECTION, "write", "nbdcopy base.img -> NBD, %s, fresh target per run, "
                        "incl. final flush" % size_text, "s", bench.size)
    memory = bench.group(SECTION, "memory", "peak RSS (VmHWM) of the nbdkit process", "MiB")
    startup = bench.group(SECTION, "startup", "exec of the server -> nbdinfo --size succeeds, "
                          "1 TiB disk", "ms")
    memory.row("sparse-1t", "overlay plugin, 1 TiB sparse, spread writes + nbdinfo --map",
               goal=RSS_GOAL)
    memory.row("after-write", "overlay plugin after the %s write" % size_text)
    base = make_base(bench)
    read_benchmark(bench, read, base)
    write_benchmark(bench, write, memory, base)
    memory_benchmark(bench, memory)
    startup_benchmark(bench, startup)


def make_base(bench):
    """--size bytes from /dev/urandom, synced (no writeback later) and read once (page-cached)."""
    path = bench.path("base.img")
    bench.progress("making the base: %s from /dev/urandom" % human_size(bench.size))
    with open("/dev/urandom", "rb") as src, open(path, "wb") as dst:
        left = bench.size
        while left:
            chunk = src.read(min(CHUNK, left))
            dst.write(chunk)
            left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass
    return path


def _plugin(bench, name, overlay, *params, ready=True):
    return bench.servers.nbdkit(name, "python", PLUGIN, "overlay=" + overlay, *params, ready=ready)


def _cow(bench, name, base):
    """nbdkit's cow filter over the file plugin; its overlay file goes to a folder of ours."""
    tmp = bench.path("cow-tmp")
    os.mkdir(tmp)
    env = dict(os.environ, TMPDIR=tmp)
    return bench.servers.nbdkit(name, "--filter=cow", "file", base, env=env), tmp


def _qcow2(bench, base):
    path = bench.path("overlay.qcow2")
    bench.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path])
    return path


def rotated(items, i):
    """items starting at position i (mod len): each row leads in turn."""
    i %= len(items)
    return items[i:] + items[:i]


def read_benchmark(bench, group, base):
    group.row("file", "nbdkit file, base.img", anchor=True)
    group.row("overlay", "overlay plugin, empty overlay on base", goal=READ_GOAL)
    group.row("overlay-held", "overlay plugin, data held in overlay", goal=READ_GOAL)
    group.row("qemu", "qemu-nbd, qcow2 overlay on base")
    group.row("cow", "nbdkit cow filter over file")
    group.row("naive", "naive Python plugin: one preadv per read (the Python floor)")

    bench.progress("read: starting servers")
    naive = bench.path("naive.py")
    with open(naive, "w") as f:
        f.write(NAIVE_PLUGIN)
    servers = {
        "file": bench.servers.nbdkit("file", "file", base),
        "overlay": _plugin(bench, "overlay", bench.path("state-empty"), "base=" + base),
        "overlay-held": _plugin(bench, "overlay-held", bench.path("state-held"), "base=" + base),
        "qemu": bench.servers.qemu_nbd("qemu-nbd", _qcow2(bench, base), "qcow2"),
        "cow": _cow(bench, "cow", base)[0],
        "naive": bench.servers.nbdkit("naive", "python", naive, "file=" + base),
    }
    bench.progress("read: filling the overlay of overlay-held with the base (not timed)")
    bench.run(["nbdcopy", base, servers["overlay-held"].uri])
    # One untimed pass each: the first read of a fresh server pays for cold caches.
    for server in servers.values():
        bench.run(["nbdcopy", server.uri, "null:"])
    for i in range(bench.runs):
        bench.progress("read: run %d/%d" % (i + 1, bench.runs))
        for key in rotated(list(group.rows), i):
            seconds, cpu = bench.timed_cpu(["nbdcopy", servers[key].uri, "null:"],
                                           [servers[key].pid])
            group.add(key, seconds, cpu=cpu)
    for server in servers.values():
        bench.servers.stop(server)


def write_benchmark(bench, group, memory, base):
    group.row("file", "nbdkit file, fresh sparse file", anchor=True)
    group.row("overlay", "overlay plugin, fresh overlay on base", goal=WRITE_GOAL)
    group.row("qemu", "qemu-nbd, fresh qcow2 overlay on base")
    group.row("cow", "nbdkit cow filter over file")

    def start(key):
        """A fresh target and its server; returns (server, paths to delete afterwards)."""
        if key == "file":
            path = bench.path("target.img")
            with open(path, "wb") as f:
                f.truncate(bench.size)
            return bench.servers.nbdkit("file", "file", path), [path]
        if key == "overlay":
            state = bench.path("state-write")
            server = _plugin(bench, "overlay", state, "base=" + base, "size=%d" % bench.size)
            return server, [state]
        if key == "qemu":
            path = _qcow2(bench, base)
            return bench.servers.qemu_nbd("qemu-nbd", path, "qcow2"), [path]
        server, tmp = _cow(bench, "cow", base)
        return server, [tmp]

    # Run 0 is an untimed warm-up round: the first write of this size into a
    # fresh folder was measured 2-3x slower, whichever target came first (the
    # filesystem and the VM's disk allocating blocks for the first time).
    for i in range(bench.runs + 1):
        bench.progress("write: %s" % ("warm-up round" if i == 0 else "run %d/%d" % (i, bench.runs)))
        for key in rotated(list(group.rows), i):
            server, paths = start(key)
            # --flush: nbdcopy does not flush by default, and a write that is
            # not durable is not what an overlay promises.
            seconds, cpu = bench.timed_cpu(["nbdcopy", "--flush", base, server.uri],
                                           [server.pid])
            rss = bench.servers.stop(server)
            if i > 0:
                group.add(key, seconds, cpu=cpu)
                if key == "overlay" and rss is not None:
                    memory.add("after-write", rss / 2**20)
            for path in paths:
                _remove(path)


def memory_benchmark(bench, group):
    for i in range(bench.runs):
        bench.progress("memory: run %d/%d" % (i + 1, bench.runs))
        state = bench.path("state-1t")
        server = _plugin(bench, "overlay-1t", state, "size=%d" % BIG)
        spread_writes(server.sock, BIG)
        bench.run(["nbdinfo", "--map", server.uri])
        rss = bench.servers.stop(server)
        group.add("sparse-1t", rss / 2**20)
        _remove(state)


def spread_writes(sock, size, count=32, length=1 << 20):
    """count writes of length bytes spread over the disk, off cluster boundaries, then flush.

    Reads one back so that a broken disk cannot produce a pleasant number.
    """
    h = nbd.NBD()
    h.connect_unix(sock)
    try:
        step = size // count
        payload = os.urandom(length)
        offsets = [i * step + (i * 12345) % step for i in range(count)]
        offsets = [min(o, size - length) for o in offsets]
        for off in offsets:
            h.pwrite(payload, off)
        h.flush()
        if h.pread(length, offsets[-1]) != payload:
            raise RuntimeError("1 TiB disk: read-back differs from what was written")
    finally:
        h.shutdown()


def startup_benchmark(bench, group):
    group.row("trivial", "nbdkit python, trivial plugin", anchor=True)
    group.row("null", "nbdkit null size=1T")
    group.row("fresh", "overlay plugin, new 1 TiB overlay")
    group.row("reopen", "overlay plugin, re-open it")
    trivial = bench.path("trivial_plugin.py")
    with open(trivial, "w") as f:
        f.write(TRIVIAL_PLUGIN)

    def measure(key):
        """Start-up time(s) in ms; "fresh" measures the re-open of the same folder too."""
        if key == "trivial":
            server = bench.servers.nbdkit("trivial", "python", trivial, ready=False)
        elif key == "null":
            server = bench.servers.nbdkit("null", "null", "size=%d" % BIG, ready=False)
        else:
            state = bench.path("state-start")
            server = _plugin(bench, "overlay-fresh", state, "size=%d" % BIG, ready=False)
            group.add("fresh", server.wait_ready() * 1000)
            bench.servers.stop(server)
            server = _plugin(bench, "overlay-reopen", state, ready=False)
            group.add("reopen", server.wait_ready() * 1000)
            bench.servers.stop(server)
            _remove(state)
            return
        group.add(key, server.wait_ready() * 1000)
        bench.servers.stop(server)

    for i in range(bench.runs):
        bench.progress("startup: run %d/%d" % (i + 1, bench.runs))
        for key in rotated(["trivial", "null", "fresh"], i):
            measure(key)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
