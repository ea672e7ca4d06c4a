"""Extents: what a range of a disk or backend reads as.

Every backend, store and job speaks in :class:`Extent` (offset, length, zero):
``zero`` means the range is known to read as zeros.  Only the nbdkit entry
script turns extents into nbdkit's flag bits.
"""

import collections


class Extent(collections.namedtuple("Extent", "offset length zero")):
    """(offset, length, zero): a plain tuple with names (collections, not typing:
    every nbdkit start imports this, and typing alone costs ~4 ms there)."""

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


def append_merged(extents: list, offset: int, length: int, zero: bool) -> None:
    """Append a range to a list of extents, merging it with a contiguous equal last one."""
    if length <= 0:
        return
    if extents:
        last = extents[-1]
        if last.zero == zero and last.offset + last.length == offset:
            extents[-1] = Extent(last.offset, last.length + length, zero)
            return
    extents.append(Extent(offset, length, zero))
