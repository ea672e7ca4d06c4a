"""The invariants, checked after every step (docs/soak.md has the table)."""

import collections
import os
import time

import nbd

from .bounds import (CANCEL_FREE, CANCEL_SLACK, FD_BOUND, QMP_BOUND, REQUEST_BOUND,
                     REQUEST_ERROR, RETIRED_GRACE, RSS_BOUND, TRACEBACK, Violation)
from .model import first_missing

MiB = 1 << 20


def _check_retired(soak):
    now = time.monotonic()
    for t in soak.retired:
        if t.stopped or now - max(t.retired, t.running_since) < RETIRED_GRACE:
            continue
        mtime = os.stat(t.path).st_mtime_ns
        if t.baseline is None:
            t.baseline = mtime
        elif mtime != t.baseline:
            raise Violation("%r was written after its job ended" % t)


def check(soak):
    rig = soak.rig
    if not rig.alive:
        raise Violation("the disk's nbdkit exited (%s)" % rig.disk.proc.returncode)
    soak.settle()
    with soak.clients_paused():
        _check_disk(soak)
        _check_bitmaps(soak)
        if soak.store is not None and soak.store.read() != soak.model.snapshot():
            raise Violation("the disk is served from %s, which differs from the model"
                            % soak.store)
    _check_retired(soak)
    _check_clients(soak)
    _check_replies(soak)
    _check_log_and_process(soak)
    soak._cancels = []


def read_disk(soak, uri=None):
    h = nbd.NBD()
    h.connect_uri(uri or soak.rig.disk_uri)
    try:
        step = 4 * MiB
        return b"".join(bytes(h.pread(min(step, soak.model.size - o), o))
                        for o in range(0, soak.model.size, step))
    finally:
        h.shutdown()


def _check_disk(soak):
    problems = soak.model.verify(read_disk(soak))
    if problems:
        raise Violation("the disk differs from the model:\n  " + "\n  ".join(problems))


def _check_bitmaps(soak):
    listed = {b["name"]: b for b in soak.rig.block()["dirty-bitmaps"]}
    if set(listed) != set(soak.model.bitmaps):
        raise Violation("bitmaps listed %s, expected %s"
                        % (sorted(listed), sorted(soak.model.bitmaps)))
    for name, bitmap in soak.model.bitmaps.items():
        info = listed[name]
        if info["recording"] != bitmap.recording or info["persistent"] != bitmap.persistent:
            raise Violation("bitmap %s is %s, expected %s" % (name, info, bitmap.describe()))
        extents = soak.bitmap_extents(name)
        gap = first_missing(bitmap.changes, extents, bitmap.granularity)
        if gap is not None:
            raise Violation("bitmap %s misses changed range %d+%d" % (bitmap.describe(),
                                                                       gap[0], gap[1]))
        if bitmap.exact is not None and extents != bitmap.exact:
            raise Violation("disabled bitmap %s changed" % bitmap.describe())


def _extra_allowed(soak, r):
    return max([extra for start, end, extra in soak._allowances
                if start <= r.end and (end is None or r.start <= end)] or [0.0])


def _check_clients(soak):
    for client in (soak.writer, soak.reader):
        for when, problem in client.problems:
            raise Violation("%s: %s" % (client.name, problem))
        for r in client.take_requests():
            soak.maxima["request s"] = max(soak.maxima["request s"], r.seconds)
            if r.error is not None:
                if any(s <= r.end and r.start <= e and r.error.startswith(name + ":")
                       for s, e, name in soak._error_windows):
                    soak.counts["client errors allowed"] += 1
                    continue
                if r.generation == soak.rig.generation:
                    raise Violation("%s's %s failed with the server up: %s"
                                    % (r.client, r.kind, r.error))
                continue
            bound = REQUEST_BOUND + _extra_allowed(soak, r)
            if r.seconds > bound:
                raise Violation("%s's %s took %.2fs (bound %.1fs)"
                                % (r.client, r.kind, r.seconds, bound))
            for asked, came, kind in soak._cancels:
                waited = r.end - max(r.start, asked)
                if waited > CANCEL_FREE and (kind == "mirror" or r.end > came + CANCEL_SLACK):
                    raise Violation("%s's %s went on %.2fs after a forced cancel was asked "
                                    "(%.2fs after its event)"
                                    % (r.client, r.kind, waited, r.end - came))
    now = time.monotonic()
    soak._allowances = collections.deque(
        ((s, now if e is None else e, x) for s, e, x in soak._allowances), maxlen=64)


def _check_replies(soak):
    for command, seconds, start in soak.rig.qmp_times:
        soak.maxima["qmp reply s"] = max(soak.maxima["qmp reply s"], seconds)
        if seconds > QMP_BOUND:
            raise Violation("the reply to %s took %.2fs (bound %.1fs)"
                            % (command, seconds, QMP_BOUND))
    soak.rig.qmp_times.clear()


def _check_log_and_process(soak):
    text = soak.rig.new_log()
    for match in TRACEBACK.finditer(text):
        if REQUEST_ERROR.search(match.group(0)):
            continue          # an error returned to a client: _check_clients judges it
        at = match.start()
        raise Violation("a Python traceback in the server log:\n"
                        + text[max(0, at - 600):at + 2000])
    rss, fds = soak.rig.process()
    soak.rss.append((soak.rig.generation, rss))
    soak.maxima["rss MiB"] = max(soak.maxima["rss MiB"], rss / MiB)
    soak.maxima["fds"] = max(soak.maxima["fds"], fds)
    if rss > RSS_BOUND or fds > FD_BOUND:
        raise Violation("the server holds %d MiB and %d descriptors (bounds %d MiB, %d)"
                        % (rss // MiB, fds, RSS_BOUND // MiB, FD_BOUND))
