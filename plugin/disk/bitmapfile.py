"""The on-disk format of persistent dirty bitmaps (format version 1), read-only.

STATE_DIR/bitmaps/ holds (docs/bitmaps.md has the byte layout):

    regions            the shared region record: one byte per region of the
                       disk, 1 = a client may have changed it since every
                       recording bitmap's saved copy was written
    NNNNNNNN.bitmap    one persistent bitmap: a header (name, granularity,
                       disk size) and two copies of its bits, each with a
                       generation and a crc32; the valid copy with the higher
                       generation is the bitmap's saved contents
    *.tmp              a half-made file (an add or a remove that did not
                       finish): ignored, removed once the checks passed

This module parses and checks; it never writes (bitmaprecord.py does).
read_bitmaps() is both the start-up check (statedir.py: a damaged file is
refused with one line naming it, and nothing is changed) and the loader
(bitmaps.py), so the two cannot disagree.
"""

import os
import re
import stat
import struct
import zlib

from .statecheck import BITMAPS, Damaged

FORMAT_VERSION = 1
REGIONS = "regions"
SUFFIX = ".bitmap"
TMP = ".tmp"
NAME_RE = re.compile(r"^(\d{1,9})\.bitmap$")
MAX_NAME = 1023                     # characters, as QEMU's BDRV_BITMAP_MAX_NAME_SIZE
MIN_GRANULARITY, MAX_GRANULARITY = 512, 64 << 20
MIN_REGION = 1 << 20
MAX_REGIONS = 65536
BLOCK = 4096

REGIONS_MAGIC = b"OVBMREG\0"
BITMAP_MAGIC = b"OVBITMP\0"
COPY_MAGIC = b"OVBMCPY\0"
# regions: magic, version, header bytes, disk size, region size, regions; crc32 at 60
REGIONS_HEADER = struct.Struct("<8sIIQQQ20x")
# bitmap: magic, version, header bytes, disk size, granularity, copy data bytes,
# copy stride, name bytes; crc32 at 60 (over bytes 0..60 and the name)
BITMAP_HEADER = struct.Struct("<8sIIQQQQI8x")
# copy: magic, generation, flags; crc32 at 24 (over bytes 0..24 and the data)
COPY_HEADER = struct.Struct("<8sQI4x")
HEADER_BYTES = 64
COPY_HEADER_BYTES = 32
FLAG_RECORDING = 1
assert REGIONS_HEADER.size == BITMAP_HEADER.size == 60 and COPY_HEADER.size == 24


def region_size_for(size):
    """Regions: a power of two >= 1 MiB, at most MAX_REGIONS of them."""
    region = MIN_REGION
    while (size + region - 1) // region > MAX_REGIONS:
        region *= 2
    return region


def nregions(size, region):
    return max(1, (size + region - 1) // region)


def data_bytes(size, granularity):
    return ((size + granularity - 1) // granularity + 7) // 8


def _align(n):
    return (n + BLOCK - 1) // BLOCK * BLOCK


def layout(size, granularity, name_bytes):
    """(header bytes, copy data bytes, copy stride) of a bitmap file."""
    nbytes = data_bytes(size, granularity)
    return _align(HEADER_BYTES + name_bytes), nbytes, _align(COPY_HEADER_BYTES + nbytes)


def _crc(*parts):
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return struct.pack("<I", c)


# -- encoding (used by bitmaprecord.py) ----------------------------------------

def regions_header(size, region):
    body = REGIONS_HEADER.pack(REGIONS_MAGIC, FORMAT_VERSION, HEADER_BYTES, size, region,
                               nregions(size, region))
    return body + _crc(body)


def bitmap_header(size, granularity, name):
    raw = name.encode("utf-8")
    header_bytes, nbytes, stride = layout(size, granularity, len(raw))
    body = BITMAP_HEADER.pack(BITMAP_MAGIC, FORMAT_VERSION, header_bytes, size, granularity,
                              nbytes, stride, len(raw))
    block = body + _crc(body, raw) + raw
    return block + bytes(header_bytes - len(block))


def copy_block(generation, recording, data):
    """One copy: its 32-byte header and the data (the caller writes it at the copy's place)."""
    body = COPY_HEADER.pack(COPY_MAGIC, generation, FLAG_RECORDING if recording else 0)
    return body + _crc(body, data) + bytes(4) + data


# -- reading and checking -------------------------------------------------------

class Saved:
    """A persistent bitmap as read from its file."""

    __slots__ = ("file_id", "path", "name", "granularity", "recording", "generation",
                 "copy", "data", "header_bytes", "stride")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class SavedRegions:
    __slots__ = ("path", "region_size", "bits")

    def __init__(self, path, region_size, bits):
        self.path, self.region_size, self.bits = path, region_size, bits


def _regular(path, what):
    try:
        st = os.lstat(path)
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    if not stat.S_ISREG(st.st_mode):
        raise Damaged(path, "not a regular file (%s)" % what)
    return st.st_size


def _read(path, length, what):
    try:
        with open(path, "rb") as f:
            data = f.read(length + 1)
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    if len(data) != length:
        raise Damaged(path, "changed while being read (%s)" % what)
    return data


def _version(path, version):
    if version != FORMAT_VERSION:
        newer = " (written by a newer server)" if version > FORMAT_VERSION else ""
        raise Damaged(path, "bitmap format version %d%s; this server reads version %d"
                      % (version, newer, FORMAT_VERSION))


def read_regions(path, size):
    """STATE_DIR/bitmaps/regions: the header, then one byte (0 or 1) per region."""
    length = _regular(path, "the bitmaps' region record")
    if length < HEADER_BYTES:
        raise Damaged(path, "%d bytes: shorter than its %d-byte header" % (length, HEADER_BYTES))
    data = _read(path, length, "the region record")
    magic, version, header_bytes, disk_size, region, n = REGIONS_HEADER.unpack_from(data)
    if magic != REGIONS_MAGIC:
        raise Damaged(path, "not a region record (bad magic)")
    if data[60:64] != _crc(data[:60]):
        raise Damaged(path, "header checksum mismatch: corrupt")
    _version(path, version)
    if header_bytes != HEADER_BYTES:
        raise Damaged(path, "header size %d, not %d" % (header_bytes, HEADER_BYTES))
    if disk_size != size:
        raise Damaged(path, "made for a disk of %d bytes, but size is %d in meta.json"
                      % (disk_size, size))
    if region < MIN_REGION or region & (region - 1) or n != nregions(size, region):
        raise Damaged(path, "region size %d / %d regions do not fit the disk size %d"
                      % (region, n, size))
    if length != HEADER_BYTES + n:
        raise Damaged(path, "%d bytes, but %d regions need %d" % (length, n, HEADER_BYTES + n))
    bits = data[HEADER_BYTES:]
    bad = bits.translate(None, b"\x00\x01")
    if bad:
        at = bits.index(bad[0])
        raise Damaged(path, "byte 0x%02x for region %d: must be 0 or 1" % (bad[0], at))
    return SavedRegions(path, region, bytearray(bits))


def read_bitmap(path, file_id, size):
    """One NNNNNNNN.bitmap file: header, two copies; returns the newer valid copy."""
    length = _regular(path, "a persistent dirty bitmap")
    if length < HEADER_BYTES:
        raise Damaged(path, "%d bytes: shorter than its %d-byte header" % (length, HEADER_BYTES))
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            (magic, version, header_bytes, disk_size, granularity, nbytes, stride,
             name_bytes) = BITMAP_HEADER.unpack_from(head)
            if magic != BITMAP_MAGIC:
                raise Damaged(path, "not a dirty bitmap file (bad magic)")
            raw = f.read(min(name_bytes, 4 * MAX_NAME))
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    if head[60:64] != _crc(head[:60], raw) or len(raw) != name_bytes:
        raise Damaged(path, "header checksum mismatch: corrupt")
    _version(path, version)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Damaged(path, "bitmap name is not UTF-8") from None
    if not name or len(name) > MAX_NAME:
        raise Damaged(path, "bitmap name must have 1 to %d characters" % MAX_NAME)
    if disk_size != size:
        raise Damaged(path, "bitmap %r was made for a disk of %d bytes, but size is %d in "
                      "meta.json" % (name, disk_size, size))
    if (granularity < MIN_GRANULARITY or granularity > MAX_GRANULARITY
            or granularity & (granularity - 1)):
        raise Damaged(path, "granularity %d: must be a power of 2 from %d to %d"
                      % (granularity, MIN_GRANULARITY, MAX_GRANULARITY))
    if (header_bytes, nbytes, stride) != layout(size, granularity, name_bytes):
        raise Damaged(path, "header sizes %d/%d/%d do not fit granularity %d"
                      % (header_bytes, nbytes, stride, granularity))
    if length != header_bytes + 2 * stride:
        raise Damaged(path, "%d bytes, but bitmap %r needs %d" % (length, name,
                                                                   header_bytes + 2 * stride))
    copies = []
    for k in (0, 1):
        copy = _read_copy(path, header_bytes + k * stride, nbytes)
        if copy is not None:
            copies.append((copy[0], k, copy[1], copy[2]))
    if not copies:
        raise Damaged(path, "bitmap %r: neither saved copy is intact (checksums)" % name)
    if len(copies) == 2 and copies[0][0] == copies[1][0]:
        raise Damaged(path, "bitmap %r: both saved copies have generation %d"
                      % (name, copies[0][0]))
    generation, k, recording, data = max(copies)
    _check_padding(path, name, data, size, granularity)
    return Saved(file_id=file_id, path=path, name=name, granularity=granularity,
                 recording=recording, generation=generation, copy=k, data=data,
                 header_bytes=header_bytes, stride=stride)


def _read_copy(path, offset, nbytes):
    """(generation, recording, data) of the copy at offset, or None: never written, or
    torn by a crash while it was being written (its crc32 does not match)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            block = f.read(COPY_HEADER_BYTES + nbytes)
    except OSError as e:
        raise Damaged(path, e.strerror) from None
    magic, generation, flags = COPY_HEADER.unpack_from(block)
    data = block[COPY_HEADER_BYTES:]
    if magic != COPY_MAGIC or block[24:28] != _crc(block[:24], data) or generation == 0:
        return None
    return generation, bool(flags & FLAG_RECORDING), data


def _check_padding(path, name, data, size, granularity):
    nbits = (size + granularity - 1) // granularity
    if nbits & 7 and data[-1] >> (nbits & 7):
        raise Damaged(path, "bitmap %r: bits set past the end of the disk" % name)


def read_bitmaps(state_dir, size):
    """Check and read STATE_DIR/bitmaps; returns (SavedRegions or None, [Saved]).

    Raises Damaged (one line naming the file) for anything wrong; reads only.
    """
    folder = os.path.join(state_dir, BITMAPS)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None, []
    except OSError as e:
        raise Damaged(folder, e.strerror) from None
    if not stat.S_ISDIR(st.st_mode):
        raise Damaged(folder, "not a directory (the persistent dirty bitmaps)")
    regions = None
    saved = []
    names = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.endswith(TMP):
            continue
        if entry == REGIONS:
            regions = read_regions(path, size)
            continue
        m = NAME_RE.match(entry)
        if not m:
            raise Damaged(path, "unknown file in the bitmaps folder")
        bitmap = read_bitmap(path, int(m.group(1)), size)
        if bitmap.name in names:
            raise Damaged(path, "bitmap %r is also in %s" % (bitmap.name, names[bitmap.name]))
        names[bitmap.name] = path
        saved.append(bitmap)
    if saved and regions is None:
        raise Damaged(os.path.join(folder, REGIONS), "missing (the region record of the "
                      "persistent bitmaps %s)" % ", ".join(repr(b.name) for b in saved))
    return regions, saved


def leftovers(state_dir):
    """The *.tmp files a crashed add or remove left (removed once the checks passed)."""
    folder = os.path.join(state_dir, BITMAPS)
    try:
        return [os.path.join(folder, e) for e in os.listdir(folder) if e.endswith(TMP)]
    except OSError:
        return []
