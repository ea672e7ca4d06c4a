"""Dirty bitmap: which parts of the disk changed since a job last copied them.

One byte per granule (granularity is a power of two, 512 B to 64 MiB), so runs
are found with bytearray.find at C speed.  Thread safe: client write threads
mark, the job thread takes runs and clears them.

Parts: a small change inside one granule that was clean (mark_part) also
records which bytes of it changed, and take_part() says which bytes of a run
need copying: a mirror in READY then copies a guest's 4 KiB write, not the
64 KiB granule around it (the rest of the granule was clean: the target holds
it, or a copy of it is in flight).  Any other mark of a granule drops its part
(the whole granule is copied), so a part is never narrower than what changed.
"""

import threading

_CLEAN = b"\x00"
_DIRTY = b"\x01"


class DirtyBitmap:
    def __init__(self, size, granularity):
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError("granularity must be a power of 2, at least 512")
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._bits = bytearray((size + granularity - 1) >> self._shift)
        self._count = 0
        self._parts = {}          # granule -> (start, end): the bytes that changed in it
        self._lock = threading.Lock()

    def _span(self, offset, length):
        first = offset >> self._shift
        end = min((offset + length + self.granularity - 1) >> self._shift, len(self._bits))
        return first, end

    def mark(self, offset, length):
        """Mark every granule that [offset, offset+length) touches dirty.

        Returns True if the bitmap was clean before (the job may be idle).
        """
        if length <= 0:
            return False
        first, end = self._span(offset, length)
        with self._lock:
            bits = self._bits
            was_clean = self._count == 0
            before = bits.count(_DIRTY, first, end)
            bits[first:end] = _DIRTY * (end - first)
            self._count += (end - first) - before
            if self._parts:
                self._drop_parts(first, end)
        return was_clean

    def mark_part(self, offset, length):
        """mark(), remembering which bytes changed when the change lies inside one
        granule that was clean (or held only such changes)."""
        if length <= 0:
            return False
        first = offset >> self._shift
        if (offset + length - 1) >> self._shift != first or first >= len(self._bits):
            return self.mark(offset, length)
        stop = min(offset + length, self.size)
        with self._lock:
            was_clean = self._count == 0
            if self._bits[first] == 0:
                self._bits[first] = 1
                self._count += 1
                self._parts[first] = (offset, stop)
            else:
                part = self._parts.get(first)
                if part is not None:
                    self._parts[first] = (min(part[0], offset), max(part[1], stop))
        return was_clean

    def _drop_parts(self, first, end):
        parts = self._parts
        if end - first < len(parts):
            for g in range(first, end):
                parts.pop(g, None)
        else:
            for g in [g for g in parts if first <= g < end]:
                del parts[g]

    def mark_all(self):
        self.mark(0, self.size)

    def clear(self, offset, length):
        """Clear the granules [offset, offset+length) covers (offset granule aligned)."""
        first, end = self._span(offset, length)
        with self._lock:
            bits = self._bits
            self._count -= bits.count(_DIRTY, first, end)
            bits[first:end] = _CLEAN * (end - first)
            if self._parts:
                self._drop_parts(first, end)

    def take(self, start, max_length):
        """Find the next dirty run at or after start (wrapping), clear it and return it.

        Returns (offset, length) of at most max_length bytes, granule aligned
        (the last granule is cut at the disk size), or None when clean.
        """
        run = self.take_part(start, max_length)
        return None if run is None else run[:2]

    def take_part(self, start, max_length):
        """take(), and the bytes of the run that changed: (offset, length,
        changed_offset, changed_length).  Only the run's first and last granules
        can narrow it (from their parts); the granules between are whole."""
        with self._lock:
            if not self._count:
                return None
            bits = self._bits
            i = bits.find(_DIRTY, start >> self._shift)
            if i < 0:
                i = bits.find(_DIRTY)
            max_granules = max(1, max_length >> self._shift)
            end = bits.find(_CLEAN, i, i + max_granules)
            if end < 0:
                end = min(i + max_granules, len(bits))
            bits[i:end] = _CLEAN * (end - i)
            self._count -= end - i
            head = tail = None
            if self._parts:
                head = self._parts.get(i)
                tail = self._parts.get(end - 1)
                self._drop_parts(i, end)
        offset = i << self._shift
        stop = min(end << self._shift, self.size)
        lo = head[0] if head is not None else offset
        hi = tail[1] if tail is not None else stop
        return offset, stop - offset, lo, hi - lo

    def dirty_bytes(self):
        with self._lock:
            return min(self._count << self._shift, self.size)

    def is_clean(self):
        return self._count == 0

    def mark_regions(self, out, region_shift, first=0, end=None):
        """Set out[r] = 1 for every region r in [first, end) (of 2**region_shift
        bytes, at least a granule) that holds a dirty granule."""
        step = region_shift - self._shift
        with self._lock:
            bits = self._bits
            stop = len(bits) if end is None else min(len(bits), end << step)
            i = bits.find(_DIRTY, first << step, stop)
            while i >= 0:
                r = i >> step
                out[r] = 1
                i = bits.find(_DIRTY, (r + 1) << step, stop)
