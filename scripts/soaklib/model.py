"""What the disk must hold, as its clients know it: the model every check compares with.

A change (write, zero, trim) is applied to the model when the server acknowledges it;
a flush that the server acknowledges makes every change before it *flushed*.  The
served disk keeps every acknowledged change across kill -9 (docs/overlay.md, "Between
flushes"), so after a restart the model is still exact, except for a change that was
in flight when the server went away: it is *doubtful* (each sector holds its old or its
new bytes) until the next full read settles it.

The writer is the only client that changes the disk, one change at a time, so the
model needs no more than: the bytes, the change in flight, the doubtful changes, and a
short history of changes begun (the reader uses it to skip a read that overlapped one).

Dirty bitmaps are modelled too: the changes each recording bitmap must hold since it
was added or cleared (docs/bitmaps.md: every change is in every recording bitmap before
it is issued, so an acknowledged change must be there; more is allowed).
"""

import collections
import threading

BLOCK = 4096        # the clients' unit: every offset and length is a multiple of it
SECTOR = 512        # a change that failed in flight lands, or not, sector by sector


class Mask:
    """One byte per BLOCK of the disk: which blocks some changes touched."""

    def __init__(self, size, bits=None):
        self.size = size
        self.bits = bytearray(size // BLOCK) if bits is None else bytearray(bits)

    def add(self, offset, length):
        first, end = offset // BLOCK, -(-(offset + length) // BLOCK)
        self.bits[first:end] = b"\x01" * (end - first)

    def update(self, other):
        n = len(self.bits)
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits = bytearray(merged.to_bytes(n, "little"))

    def clear(self):
        self.bits = bytearray(len(self.bits))

    def copy(self):
        return Mask(self.size, self.bits)

    def count(self):
        return self.bits.count(1) * BLOCK

    def runs(self):
        """(offset, length) of every run of touched blocks, in order."""
        bits, pos = self.bits, 0
        while True:
            start = bits.find(1, pos)
            if start < 0:
                return
            end = bits.find(0, start)
            end = len(bits) if end < 0 else end
            yield start * BLOCK, (end - start) * BLOCK
            pos = end

    @classmethod
    def of(cls, size, ranges):
        mask = cls(size)
        for offset, length in ranges:
            mask.add(offset, length)
        return mask


def first_missing(required, held, granularity):
    """The first range of `required` (a Mask), widened to whole granules, that the
    ranges `held` (a bitmap's extents) do not cover; None if they cover it all."""
    size = required.size
    widened = Mask(size)
    for offset, length in required.runs():
        start = offset // granularity * granularity
        end = min(size, -(-(offset + length) // granularity) * granularity)
        widened.add(start, end - start)
    have = Mask.of(size, held)
    n = len(widened.bits)
    missing = int.from_bytes(widened.bits, "little") & ~int.from_bytes(have.bits, "little")
    if not missing:
        return None
    gap = Mask(size, missing.to_bytes(n, "little"))
    return next(gap.runs())


class Change:
    """One client request: kind is write, zero, trim or flush."""

    __slots__ = ("kind", "offset", "length", "data", "seq")

    def __init__(self, kind, offset=0, length=0, data=None):
        self.kind, self.offset, self.length, self.data = kind, offset, length, data
        self.seq = 0

    def new_bytes(self):
        return self.data if self.kind == "write" else bytes(self.length)

    def __repr__(self):
        return "%s(%d+%d)" % (self.kind, self.offset, self.length)


class BitmapModel:
    """What one dirty bitmap must hold."""

    def __init__(self, name, size, granularity, persistent, recording):
        self.name, self.granularity = name, granularity
        self.persistent, self.recording = persistent, recording
        self.changes = Mask(size)     # acknowledged changes since its add or clear
        self.exact = None             # disabled: the extents it must keep, exactly
        self.busy = False             # held by a backup
        self.frozen = None            # an incremental backup's point in time (a Mask)
        self.breaks = 0               # times it stopped covering every change (disable, clear)

    def describe(self):
        return "%s(g=%d %s %s)" % (self.name, self.granularity,
                                   "persistent" if self.persistent else "transient",
                                   "recording" if self.recording else "disabled")


class DiskModel:
    def __init__(self, data):
        self.data = bytearray(data)
        self.size = len(data)
        self.lock = threading.Lock()
        self.seq = 0
        self.begun = collections.deque(maxlen=8192)   # (seq, offset, length)
        self.in_flight = None
        self.unflushed = Mask(self.size)              # changed since the last good flush
        self.doubtful = []                            # [(offset, old bytes, new bytes)]
        self.bitmaps = {}                             # name -> BitmapModel
        self.acked_changes = self.acked_flushes = 0

    def reset(self, data):
        """A new disk (clients idle): its bytes, nothing unflushed, no bitmaps."""
        with self.lock:
            self.data[:] = data
            self.begun.clear()
            self.unflushed.clear()
            self.doubtful = []
            self.bitmaps = {}

    # -- the writer ----------------------------------------------------------

    def begin(self, change):
        with self.lock:
            self.seq += 1
            change.seq = self.seq
            if change.kind != "flush":
                self.begun.append((self.seq, change.offset, change.length))
            self.in_flight = change

    def acked(self, change):
        with self.lock:
            self.in_flight = None
            if change.kind == "flush":
                self.unflushed.clear()
                self.acked_flushes += 1
                return
            off, n = change.offset, change.length
            self.data[off:off + n] = change.new_bytes()
            self.unflushed.add(off, n)
            for bitmap in self.bitmaps.values():
                if bitmap.recording:
                    bitmap.changes.add(off, n)
            self.acked_changes += 1

    def failed(self, change):
        """The server did not answer the change (it died, or refused it): doubtful."""
        with self.lock:
            self.in_flight = None
            if change.kind != "flush":
                off, n = change.offset, change.length
                self.doubtful.append((off, bytes(self.data[off:off + n]), change.new_bytes()))

    # -- the reader ----------------------------------------------------------

    def read_begin(self, offset, length):
        """The sequence number to check the read against, or None to skip it."""
        with self.lock:
            if self._overlaps_unknown(offset, length):
                return None
            return self.seq

    def read_check(self, offset, length, since, got):
        """None if the read is right or must be skipped; else what is wrong."""
        with self.lock:
            if self._overlaps_unknown(offset, length):
                return None
            if self.begun and self.begun[0][0] > since + 1:
                return None                   # the history no longer reaches back
            end = offset + length
            for seq, off, n in reversed(self.begun):
                if seq <= since:
                    break
                if off < end and offset < off + n:
                    return None               # changed while being read
            want = bytes(self.data[offset:end])
        if got == want:
            return None
        first = next(i for i in range(length) if got[i] != want[i])
        return ("a read of %d+%d differs from the model from byte %d (%d bytes differ)"
                % (offset, length, offset + first, sum(a != b for a, b in zip(got, want))))

    def _overlaps_unknown(self, offset, length):
        end = offset + length
        c = self.in_flight
        if c is not None and c.kind != "flush" and c.offset < end and offset < c.offset + c.length:
            return True
        return any(off < end and offset < off + len(old) for off, old, _ in self.doubtful)

    # -- the full check ------------------------------------------------------

    def verify(self, actual):
        """Compare a full read (clients idle) with the model; settle doubtful changes.

        Returns a list of problems: bytes lost that a flush had covered, bytes lost
        that were acknowledged but not flushed, a doubtful change that left neither
        its old nor its new bytes.
        """
        problems = []
        with self.lock:
            assert self.in_flight is None, "verify with a change in flight"
            for off, old, new in self.doubtful:
                got = actual[off:off + len(old)]
                for s in range(0, len(old), SECTOR):
                    piece = got[s:s + SECTOR]
                    if piece != old[s:s + SECTOR] and piece != new[s:s + SECTOR]:
                        problems.append("a change that failed in flight (%d+%d) left sector %d "
                                        "holding neither its old nor its new bytes"
                                        % (off, len(old), off + s))
                        break
                self.data[off:off + len(old)] = got
            self.doubtful = []
            if actual != self.data:
                problems += self._losses(actual)
                self.data[:] = actual          # go on from what is there (after reporting)
        return problems

    def _losses(self, actual):
        out = []
        for i in range(self.size // BLOCK):
            a, b = i * BLOCK, (i + 1) * BLOCK
            if actual[a:b] != self.data[a:b]:
                what = ("acknowledged but unflushed" if self.unflushed.bits[i]
                        else "flushed")
                out.append("block at %d differs from the model (%s bytes lost)" % (a, what))
                if len(out) >= 8:
                    out.append("... and maybe more")
                    break
        return out

    def snapshot(self):
        """The model's bytes now (call with the clients idle)."""
        with self.lock:
            return bytes(self.data)
