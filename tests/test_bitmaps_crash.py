"""Persistent dirty bitmaps survive kill -9 at random moments of a writer (issue 21).

Two client threads write (random 4K-1M, random data), zero, trim and flush into a
random 32 MiB window of a 256 MiB disk while three persistent bitmaps exist: 64K and
1M granularity recording, and a 64K one that is disabled (its contents frozen).  The
server is killed (-9, every fifth round SIGTERM) after a random number of answered
requests, and started again.  After each restart:

- every range a request was answered for since the bitmap's creation or last clear is
  dirty in each recording bitmap (widened to its granules);
- every 64K granule whose content differs from what it was at the creation or last
  clear is dirty too (that covers requests that reached the disk but were not answered);
- the disabled bitmap has exactly the extents it had when it was disabled;
- after a SIGTERM no region of the record is left set (the final checkpoint).

Checkpoints run during the rounds (every flush brings one forward, at most one a
second), so kills land before, during and after saves and region clears.
"""

import hashlib
import random
import threading

import nbd
import pytest

from bitmap_rig import MiB, covers, extents, granules, our_bitmaps
from helpers import Control

SIZE = 256 * MiB
WINDOW = 32 * MiB
G = 64 * 1024
ROUNDS = 32
RECORDING = {"g64k": G, "g1m": MiB}
ZERO_HASH = hashlib.sha256(bytes(G)).digest()


def _hashes(uri):
    """sha256 of every 64K granule of the disk."""
    h = nbd.NBD()
    h.connect_uri(uri)
    out = []
    chunk = 4 * MiB
    for offset in range(0, SIZE, chunk):
        data = h.pread(chunk, offset)
        out += [hashlib.sha256(data[i:i + G]).digest() for i in range(0, chunk, G)]
    h.shutdown()
    return out


class Writer:
    """Client threads doing random requests until the server dies; answered ones are kept."""

    def __init__(self, uri, rnd, answered_target):
        self.uri = uri
        self.window = rnd.randrange(0, SIZE - WINDOW + 1, MiB)
        self.answered = []            # (offset, length) of answered write/zero/trim
        self.count = 0
        self.target = answered_target
        self.reached = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(rnd.randrange(1 << 30),))
                        for _ in range(2)]

    def start(self):
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()

    def _run(self, seed):
        rnd = random.Random(seed)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while True:
                op = rnd.random()
                length = rnd.choice((4096, 65536, rnd.randrange(4096, MiB + 1, 512)))
                offset = self.window + rnd.randrange(0, WINDOW - length + 1, 512)
                if op < 0.55:
                    h.pwrite(rnd.randbytes(length), offset)
                elif op < 0.7:
                    h.zero(length, offset)
                elif op < 0.8:
                    h.trim(length, offset)
                else:
                    h.flush()
                    length = 0
                with self.lock:
                    if length:
                        self.answered.append((offset, length))
                    self.count += 1
                    if self.count >= self.target:
                        self.reached.set()
        except nbd.Error:
            pass                      # the server was killed
        finally:
            self.reached.set()


def _check(control, model, frozen, hashes):
    by_name = {b["name"]: b for b in our_bitmaps(control)}
    assert set(by_name) == set(RECORDING) | {"off"}
    assert by_name["off"]["recording"] is False
    assert extents(control, "off") == frozen
    for name, g in RECORDING.items():
        assert by_name[name]["recording"] is True
        dirty = extents(control, name)
        for offset, length in model[name]["answered"]:
            assert covers(dirty, *granules(offset, length, g)), (name, offset, length)
        base = model[name]["hashes"]
        for i, (was, now) in enumerate(zip(base, hashes)):
            if was != now:
                assert covers(dirty, *granules(i * G, G, g)), (name, "content", i * G)


@pytest.mark.slow
def test_persistent_bitmaps_hold_every_change_after_kill_9(servers, tmp_path):
    rnd = random.Random(21)
    srv = servers.overlay(tmp_path / "ov", size=SIZE)
    control = Control(srv.control)
    for name, g in RECORDING.items():
        control("block-dirty-bitmap-add", node="disk0", name=name, granularity=g,
                persistent=True)
    control("block-dirty-bitmap-add", node="disk0", name="off", persistent=True)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    for _ in range(20):                            # something for "off" to hold
        h.pwrite(rnd.randbytes(65536), rnd.randrange(0, SIZE - 65536, 4096))
    h.shutdown()
    control("block-dirty-bitmap-disable", node="disk0", name="off")
    frozen = extents(control, "off")
    assert frozen
    zeros = [ZERO_HASH] * (SIZE // G)
    hashes = _hashes(srv.uri)
    model = {name: {"answered": [], "hashes": hashes} for name in RECORDING}
    partial = 0
    for round_ in range(ROUNDS):
        if round_ % 8 == 7:                        # start one bitmap over
            name = sorted(RECORDING)[round_ // 8 % 2]
            control("block-dirty-bitmap-clear", node="disk0", name=name)
            model[name] = {"answered": [], "hashes": hashes}
        control.close()
        writer = Writer(srv.uri, rnd, rnd.randrange(3, 80))
        writer.start()
        writer.reached.wait(60)
        clean = round_ % 5 == 4
        if clean:
            srv.stop()
        else:
            srv.kill9()
        writer.join()
        for name in RECORDING:
            model[name]["answered"] += writer.answered
        if clean:
            regions = (tmp_path / "ov" / "bitmaps" / "regions").read_bytes()[64:]
            assert regions == bytes(len(regions)), "a clean stop leaves no region set"
        srv = servers.restart(srv)
        control = Control(srv.control)
        hashes = _hashes(srv.uri)
        _check(control, model, frozen, hashes)
        if our_bitmaps(control)[0]["count"] < SIZE // 2:
            partial += 1
    assert hashes != zeros
    assert partial, "the bitmaps were never less than half dirty: the test proved little"
    control.close()
