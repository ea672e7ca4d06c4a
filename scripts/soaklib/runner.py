"""The schedule (a pure function of the seed) and the loop: a step, then the checks.

Step i is drawn from the seed alone: its operation by weight, and a seed of its own
that the operation's choices come from.  So `scripts/soak --seed N` runs the same
operations with the same arguments again; what the server does in between (timing)
may differ, and the invariants must hold whatever it does.
"""

import collections
import itertools
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback

from . import bitmaps, chaos, ops        # noqa: F401 (they register their operations)
from .bounds import Skip, Violation
from .core import Soak
from .registry import OPS


def schedule(seed, pool=None):
    """Yield (index, Op, step seed) forever, drawn from pool (default: every Op)."""
    # By name: the order the modules registered them in must not matter.
    pool = sorted(pool if pool is not None else OPS, key=lambda o: o.name)
    rnd = random.Random(seed)
    weights = [o.weight for o in pool]
    index = 0
    while True:
        index += 1
        yield index, rnd.choices(pool, weights)[0], rnd.getrandbits(64)


def run(seed, seconds, workdir=None, size=32 << 20, max_steps=None, keep=False,
        out=sys.stdout, exclude=(), verbose=True):
    """Soak for `seconds` (or max_steps steps); 0 if every invariant held, else 1."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="soak-%d-" % seed)
    os.makedirs(workdir, exist_ok=True)
    soak = Soak(seed, workdir, size)
    pool = [o for o in OPS if o.name not in exclude]
    started = time.monotonic()
    status, failure = 0, None
    print("soak: seed=%d for %ds, workdir %s" % (seed, seconds, workdir), file=out, flush=True)
    stop, previous = _stop_on_signals()
    try:
        soak.start()
        soak.check()
        for index, o, step_seed in schedule(seed, pool):
            if time.monotonic() - started > seconds or (max_steps and index > max_steps):
                break
            if stop:
                status, failure = 2, "INTERRUPTED by signal %d (no violation so far)" % stop[0]
                break
            soak.begin_step()
            t0 = time.monotonic()
            try:
                what = o.fn(soak, random.Random(step_seed))
            except Skip as s:
                soak.steps.append((index, o.name, "skipped: %s" % s, 0.0))
                continue                  # nothing happened: the next check covers the time
            except Violation:
                soak.steps.append((index, o.name, "(the step itself failed)", 0.0))
                raise
            soak.steps.append((index, o.name, what, time.monotonic() - t0))
            soak.check()
            if verbose:
                print("  %4d %-14s %s" % (index, o.name, what), file=out, flush=True)
    except Violation as v:
        status, failure = 1, "VIOLATION: %s" % v
    except Exception:
        status, failure = 1, "HARNESS ERROR (or an unexpected answer):\n" + traceback.format_exc()
    finally:
        soak.close()
        _restore_signals(previous)
    report(soak, seed, time.monotonic() - started, failure, out)
    if status == 0 and own and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def _stop_on_signals():
    """SIGINT and SIGTERM end the soak after the step under way, with its servers,
    mounts and namespace cleaned up (a step may catch an interrupt of its own).
    Returns (the signals received, the handlers to put back)."""
    stop = []
    previous = {signum: signal.signal(signum, lambda signum, frame: stop.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    return stop, previous


def _restore_signals(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def report(soak, seed, elapsed, failure, out):
    p = lambda *a: print(*a, file=out, flush=True)
    if failure is None:
        p("soak: seed=%d passed: %d steps in %.0fs; writer %d requests, reader %d (%d skipped)"
          % (seed, len(soak.steps), elapsed, soak.writer.count, soak.reader.count,
             soak.reader.skipped))
        done = collections.Counter(name for _, name, what, _ in soak.steps
                                   if not what.startswith("skipped"))
        p("soak: steps done: %s" % ", ".join("%s %d" % kv for kv in sorted(done.items())))
        p("soak: jobs: %s" % ", ".join("%s %d" % kv for kv in sorted(soak.counts.items())))
        p("soak: maxima: %s" % ", ".join("%s %.2f" % kv for kv in sorted(soak.maxima.items())))
        lives = [[rss for _, rss in group] for _, group in itertools.groupby(soak.rss,
                                                                          key=lambda g: g[0])]
        life = max(lives, key=len, default=[])
        if life:
            p("soak: RSS over the longest server life (%d checks): first %d MiB, last %d MiB, "
              "max %d MiB" % (len(life), life[0] >> 20, life[-1] >> 20, max(life) >> 20))
        return
    p("")
    word = "INTERRUPTED" if failure.startswith("INTERRUPTED") else "FAILED"
    p("soak: seed=%d %s after %d steps (%.0fs)" % (seed, word, len(soak.steps), elapsed))
    p(failure.rstrip())
    p("steps (replay: scripts/soak --seed %d --steps %d):" % (seed, len(soak.steps)))
    for index, name, what, seconds in soak.steps:
        p("  %4d %-14s %s (%.2fs)" % (index, name, what, seconds))
    p("logs:")
    for path in soak.rig.logs:
        p("  disk: %s" % path)
    for server in soak.rig.servers.started:
        if server not in (soak.rig.disk,) and str(server.log_path) not in map(str, soak.rig.logs):
            p("  %s" % server.log_path)
    p("workdir (kept): %s" % soak.rig.workdir)
