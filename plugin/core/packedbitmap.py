"""PackedBitmap: one bit per granule, for the disk's long-lived dirty bitmaps.

core/bitmap.py's DirtyBitmap keeps one byte per granule, which makes the
mirror's run search simple but costs 16 MiB for a 1 TiB disk at 64 KiB; a
disk may carry several bitmaps for its whole life, so these pack eight
granules into a byte (2 MiB for the same disk).  Bit i is granule i, in byte
i // 8 at bit i % 8 (least significant first), the layout the state directory
stores (docs/bitmaps.md); bits past the last granule stay 0.

Speed where it matters: a client write marks one or a few granules
(marker(): a request inside one granule adds the granule to the bitmap's
pending set, one set.add and no lock; wider ones take the lock); counting,
merging and finding runs work on whole byte strings (int.from_bytes /
bit_count, re over bytes) at C speed.

Pending granules are marks: everything that reads or changes the bits folds
them in first, under the lock (_fold), and the marker folds every
FOLD_EVERY marks, which bounds the sets.  Why not the lock: two client
threads marking four bitmaps contended for the four locks (with the GIL),
2.9 us of CPU a write against 0.3 us for the set adds.

Thread safe: client threads mark, the control thread and the checkpoint
thread copy, clear and merge.  `changes` counts the marks that set a new bit
(a saver compares it with the value it last saved).
"""

import itertools
import re
import threading

_NONZERO = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")

# The marker folds the pending granules into the bits every this many marks.
FOLD_EVERY = 4096


def _low_bit(b):
    """Index of the lowest set bit of b (b > 0)."""
    return (b & -b).bit_length() - 1


def _popcount(data):
    return int.from_bytes(data, "little").bit_count()


class PackedBitmap:
    """Granules of `granularity` bytes (a power of 2, at least 512) over `size` bytes."""

    def __init__(self, size, granularity, data=None):
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2, at least 512")
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.nbits = (size + granularity - 1) >> self._shift
        self.nbytes = (self.nbits + 7) >> 3
        self._lock = threading.Lock()
        self._bits = bytearray(self.nbytes)
        self._pending = set()              # granules marked, not yet in _bits
        self._count = 0
        self.changes = 0
        if data is not None:
            self.load(data)

    # -- marking (client threads) -------------------------------------------

    def mark(self, offset, length):
        """Mark every granule [offset, offset+length) touches (inside the disk)."""
        shift = self._shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        if last == first and length > 0:
            # The client path (a request inside one granule): a bit test and store.
            i, m = first >> 3, 1 << (first & 7)
            bits, lock = self._bits, self._lock
            lock.acquire()
            b = bits[i]
            if not b & m:
                bits[i] = b | m
                self._count += 1
                self.changes += 1
            lock.release()
            return
        if length <= 0 or offset >= self.size:
            return
        end = min(last + 1, self.nbits)
        bits = self._bits
        with self._lock:
            lo, hi = first >> 3, (end - 1) >> 3
            before = _popcount(bits[lo:hi + 1])
            self._set(first, end)
            gained = _popcount(bits[lo:hi + 1]) - before
            if gained:
                self._count += gained
                self.changes += 1

    def _set(self, first, end):
        """Set granules [first, end) (under the lock)."""
        bits = self._bits
        lo, lo_bit = first >> 3, first & 7
        hi, hi_bit = end >> 3, end & 7
        if lo == hi:
            bits[lo] |= ((1 << hi_bit) - 1) & ~((1 << lo_bit) - 1)
            return
        bits[lo] |= (0xFF << lo_bit) & 0xFF
        if hi > lo + 1:
            bits[lo + 1:hi] = b"\xff" * (hi - lo - 1)
        if hi_bit:
            bits[hi] |= (1 << hi_bit) - 1

    def fold(self):
        """Move the pending granules into the bits."""
        with self._lock:
            self._fold()

    def _fold(self):
        """(under the lock) list() and difference_update() run in C without
        letting another thread in: a granule added meanwhile stays pending."""
        pending = self._pending
        if not pending:
            return
        granules = list(pending)
        pending.difference_update(granules)
        bits, gained = self._bits, 0
        for i in granules:
            j, m = i >> 3, 1 << (i & 7)
            b = bits[j]
            if not b & m:
                bits[j] = b | m
                gained += 1
        if gained:
            self._count += gained
            self.changes += 1

    # -- whole-bitmap operations ---------------------------------------------

    def count(self):
        """Dirty granules."""
        if self._pending:
            self.fold()
        return self._count

    def dirty_bytes(self):
        """Dirty bytes as QEMU counts them (whole granules)."""
        return self.count() << self._shift

    def snapshot(self):
        """(bytes, changes): the bits and the change counter they include."""
        with self._lock:
            self._fold()
            return bytes(self._bits), self.changes

    def load(self, data):
        """Replace the bits with data (nbytes bytes, padding bits 0)."""
        if len(data) != self.nbytes:
            raise ValueError("bitmap data has %d bytes, not %d" % (len(data), self.nbytes))
        with self._lock:
            self._fold()
            self._bits[:] = data
            self._count = _popcount(self._bits)
            self.changes += 1

    def clear(self):
        with self._lock:
            self._fold()
            self._bits[:] = bytes(self.nbytes)
            self._count = 0
            self.changes += 1

    def clear_range(self, offset, length):
        """Clear the granules that lie wholly inside [offset, offset+length)
        (a job taking out what it copied); partial granules stay dirty."""
        g = self.granularity
        first = (offset + g - 1) >> self._shift
        stop = offset + length
        end = self.nbits if stop >= self.size else stop >> self._shift
        if first >= end:
            return
        with self._lock:
            self._fold()
            lo, hi = first >> 3, (end - 1) >> 3
            before = _popcount(self._bits[lo:hi + 1])
            self._reset(first, end)
            self._count -= before - _popcount(self._bits[lo:hi + 1])
            self.changes += 1

    def _reset(self, first, end):
        """Clear granules [first, end) (under the lock)."""
        bits = self._bits
        lo, lo_bit = first >> 3, first & 7
        hi, hi_bit = end >> 3, end & 7
        if lo == hi:
            bits[lo] &= ~(((1 << hi_bit) - 1) & ~((1 << lo_bit) - 1)) & 0xFF
            return
        bits[lo] &= (1 << lo_bit) - 1
        if hi > lo + 1:
            bits[lo + 1:hi] = bytes(hi - lo - 1)
        if hi_bit:
            bits[hi] &= ~((1 << hi_bit) - 1) & 0xFF

    def merge(self, other):
        """Mark everything other marks (other may have another granularity)."""
        if other is self:
            return
        if other.granularity == self.granularity and other.size == self.size:
            data, _ = other.snapshot()
            with self._lock:
                self._fold()
                merged = int.from_bytes(self._bits, "little") | int.from_bytes(data, "little")
                before = self._count
                self._bits[:] = merged.to_bytes(self.nbytes, "little")
                self._count = merged.bit_count()
                if self._count != before:
                    self.changes += 1
            return
        pos = 0
        while True:
            runs, pos = other.runs(pos, other.size - pos, 4096)
            for start, length in runs:
                self.mark(start, length)
            if pos is None:
                return

    # -- finding runs ---------------------------------------------------------

    def runs(self, offset=0, length=None, limit=None):
        """Dirty ranges inside [offset, offset+length), in order, cut to that window.

        Returns ([(offset, length)], next): next is where to go on when `limit`
        ranges were found before the end of the window, else None.
        """
        stop = self.size if length is None else min(self.size, offset + length)
        if offset >= stop:
            return [], None
        shift = self._shift
        g0, g1 = offset >> shift, ((stop - 1) >> shift) + 1
        base = g0 >> 3
        with self._lock:
            self._fold()
            data = bytes(self._bits[base:(g1 + 7) >> 3])
        nbits = len(data) << 3
        pos, end = g0 - (base << 3), g1 - (base << 3)
        out = []
        while pos < end:
            if limit is not None and len(out) >= limit:
                return out, max(offset, (pos + (base << 3)) << shift)
            start = _next_set(data, pos, nbits)
            if start >= end:
                break
            finish = min(_next_clear(data, start, nbits), end)
            a = max(offset, (start + (base << 3)) << shift)
            b = min(stop, (finish + (base << 3)) << shift)
            out.append((a, b - a))
            pos = finish
        return out, None


def marker(bitmaps):
    """fn(offset, length): mark [offset, offset+length) in every one of bitmaps
    (the client path; see the module's docstring)."""
    bitmaps = tuple(bitmaps)
    parts = tuple((b._shift, b._pending.add, b.mark) for b in bitmaps)
    tick = itertools.count(1).__next__

    def mark_all(offset, length):
        if length <= 0:
            return
        last = offset + length - 1
        for shift, add, mark in parts:
            first = offset >> shift
            if last >> shift == first:
                add(first)
            else:
                mark(offset, length)
        if not tick() % FOLD_EVERY:
            for b in bitmaps:
                b.fold()
    return mark_all


def _next_set(data, pos, nbits):
    """The first set bit at or after pos (nbits if none)."""
    i = pos >> 3
    if i >= len(data):
        return nbits
    b = data[i] >> (pos & 7)
    if b:
        return pos + _low_bit(b)
    m = _NONZERO.search(data, i + 1)
    if m is None:
        return nbits
    j = m.start()
    return (j << 3) + _low_bit(data[j])


def _next_clear(data, pos, nbits):
    """The first clear bit at or after pos (nbits if none)."""
    i = pos >> 3
    if i >= len(data):
        return nbits
    b = (~data[i] & 0xFF) >> (pos & 7)
    if b:
        return pos + _low_bit(b)
    m = _NOT_FULL.search(data, i + 1)
    if m is None:
        return nbits
    j = m.start()
    return (j << 3) + _low_bit(~data[j] & 0xFF)
