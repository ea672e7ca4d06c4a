"""QMP wire framing: a JSON stream decoder and the reply encoder.

QMP is a stream of JSON values, not of lines: the ``qemu.qmp`` client sends
no newline after a message, several messages may arrive in one ``recv()``
and one message may be split across many.  ``StreamDecoder`` finds value
boundaries with a small byte scanner (depth counting, string and escape
tracking) and only then hands the complete bytes to ``json.loads``.

Errors never kill the stream; they are returned as ``DecodeError`` items in
the decoded sequence, and the server answers each one with a GenericError
reply, as QEMU does.  Recovery rules:

- A complete but malformed value (``{"execute": }``) is consumed whole and
  reported once; decoding continues right after it.
- A value larger than ``max_size`` (1 MiB) or nested deeper than
  ``max_nesting`` is reported as soon as the limit is crossed; the rest of
  the value is then skipped (only its structure is tracked, nothing is
  kept) until it ends, and decoding resumes after it.
- As in QEMU, an ASCII control character other than whitespace, or a byte
  0xFE/0xFF, resets the decoder: a partial value is dropped (and reported).
  This includes a raw newline inside a string, so a forgotten closing quote
  is recovered from at the end of the line.  Between values such bytes are
  ignored, so a client can send them to force a known-good state.
- A value that is valid JSON but not an object is reported as
  "QMP input must be a JSON object".
- Numbers are taken as QEMU takes them: an integer that fits neither int64
  nor uint64 becomes a double (commands then refuse it where they expect an
  int, with QEMU's text); a number beyond a double's range is a parse error.
"""

from __future__ import annotations

import json
import math
import re

MAX_MESSAGE_SIZE = 1024 * 1024
# Python's json module recurses once per nesting level; QMP messages are
# shallow, so a modest limit keeps json.loads far from the recursion limit.
MAX_NESTING = 256

_WHITESPACE = b" \t\r\n"
# Bytes that reset the decoder: control characters other than whitespace,
# and 0xFE/0xFF, which never occur in UTF-8.
_RESET_CLASS = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
_RESET_BYTES = frozenset(set(range(0x00, 0x20)) - {0x09, 0x0A, 0x0D} | {0xFE, 0xFF})

# Where the scanner must look inside a container (outside strings).
_CONTAINER_STOP = re.compile(rb'["{}\[\]' + _RESET_CLASS + rb"]")
# Where the scanner must look inside a string (any control char is invalid).
_STRING_STOP = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
# Where a bare top-level scalar (number, true, false, null, garbage) ends.
_BARE_STOP = re.compile(rb'[ \t\r\n{}\[\]",:' + _RESET_CLASS + rb"]")

_IDLE, _CONTAINER, _STRING, _BARE = range(4)


class DecodeError:
    """One undecodable input value; ``desc`` is the text for the error reply."""

    __slots__ = ("desc",)

    def __init__(self, desc):
        self.desc = desc

    def __eq__(self, other):
        return type(other) is DecodeError and other.desc == self.desc

    def __hash__(self):
        return hash(self.desc)

    def __repr__(self):
        return "DecodeError(%r)" % (self.desc,)


def encode(obj) -> bytes:
    """Serialise one QMP message: compact JSON plus CRLF, as QEMU sends.

    A non-finite float is a ValueError (JSON has none; the decoder never makes one).
    """
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\r\n"


_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1


def _parse_int(text):
    """An integer as QEMU's parser takes it: int64 or uint64, beyond that a double.

    So a command then refuses it as QEMU does ("Parameter 'speed' expects int"),
    and Python's own limit on digits (4300) never shows.  A number beyond a
    double's range is a parse error.
    """
    if len(text) <= 21:
        value = int(text)
        if _INT_MIN <= value <= _UINT_MAX:
            return value
    return _parse_float(text)


def _parse_float(text):
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise ValueError(f"number '{shown}' ({len(text)} characters) is out of range")
    return value


def _reject_constant(name):
    # JSON has no NaN/Infinity; Python's json accepts them unless told not to.
    raise ValueError(f"invalid literal '{name}'")


def _object_without_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def parse_message(raw: bytes):
    """Parse one complete JSON value into a QMP message dict, or a DecodeError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return DecodeError("JSON parse error, invalid UTF-8 sequence")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except (ValueError, RecursionError) as err:
        return DecodeError(f"JSON parse error, {err}")
    if not isinstance(value, dict):
        return DecodeError("QMP input must be a JSON object")
    return value


class StreamDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the messages completed so far.

    Each returned item is either a ``dict`` (one QMP message) or a
    ``DecodeError``.  State carries over between calls, so a message may be
    split at any byte.  Not thread-safe: one decoder per connection.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, max_nesting: int = MAX_NESTING):
        self.max_size = max_size
        self.max_nesting = max_nesting
        self._reset()

    def _reset(self):
        self._mode = _IDLE
        self._buf = bytearray()
        self._size = 0
        self._depth = 0
        self._in_container_string = False
        self._escape = False
        self._discarding = False

    def clear(self) -> None:
        """Drop any partial value (the connection is gone)."""
        self._reset()

    @property
    def buffered(self) -> int:
        """Bytes of a partial value held (at most max_size)."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """True when no partial value is buffered (useful at EOF)."""
        return self._mode == _IDLE

    def feed(self, data: bytes) -> list:
        out: list = []
        i, n = 0, len(data)
        while i < n:
            if self._mode == _IDLE:
                i = self._scan_idle(data, i, out)
            elif self._mode == _STRING:
                i = self._scan_string(data, i, out)
            elif self._mode == _CONTAINER:
                i = self._scan_container(data, i, out)
            else:
                i = self._scan_bare(data, i, out)
        return out

    # -- value bookkeeping -------------------------------------------------

    def _take(self, chunk, out) -> None:
        """Account for bytes that belong to the current value."""
        self._size += len(chunk)
        if self._discarding:
            return
        if self._size > self.max_size:
            self._start_discarding(
                out, f"JSON message exceeds the size limit of {self.max_size} bytes"
            )
            return
        self._buf += chunk

    def _start_discarding(self, out, desc) -> None:
        out.append(DecodeError(desc))
        self._discarding = True
        self._buf = bytearray()

    def _finish(self, out) -> None:
        """The current value ended: parse it unless it was being discarded."""
        if not self._discarding:
            out.append(parse_message(bytes(self._buf)))
        self._reset()

    def _abort(self, out, byte) -> None:
        """A reset byte arrived inside a value: drop the partial value."""
        if not self._discarding:
            out.append(DecodeError(f"JSON parse error, invalid character 0x{byte:02x}"))
        self._reset()

    # -- scanners: each consumes from data[i:] and returns the new index -----

    def _scan_idle(self, data, i, out) -> int:
        c = data[i]
        if c in _WHITESPACE or c in _RESET_BYTES:
            # Whitespace between values; reset bytes are a client's way to
            # resynchronise and mean nothing between values.
            return i + 1
        if c in b"{[":
            self._mode = _CONTAINER
            self._depth = 1
            self._take(data[i:i + 1], out)
            return i + 1
        if c == ord('"'):
            self._mode = _STRING
            self._in_container_string = False
            self._take(data[i:i + 1], out)
            return i + 1
        if c in b"}],:":
            out.append(DecodeError(f"JSON parse error, stray '{chr(c)}'"))
            return i + 1
        self._mode = _BARE
        return i

    def _find_stop(self, pattern, data, i, out):
        """Index of the next byte from i that pattern stops at; None (all taken) if none."""
        m = pattern.search(data, i)
        if m is None:
            self._take(data[i:], out)
            return None
        return m.start()

    def _scan_string(self, data, i, out) -> int:
        if self._escape:
            # The escaped byte itself is ordinary (\" or \\ or the u of \u).
            self._escape = False
            if data[i] in _RESET_BYTES or data[i] < 0x20:
                self._abort(out, data[i])
                return i + 1
            self._take(data[i:i + 1], out)
            return i + 1
        j = self._find_stop(_STRING_STOP, data, i, out)
        if j is None:
            return len(data)
        c = data[j]
        if c == ord('"'):
            self._take(data[i:j + 1], out)
            if self._in_container_string:
                self._mode = _CONTAINER
            else:
                self._finish(out)
            return j + 1
        if c == ord("\\"):
            self._take(data[i:j + 1], out)
            self._escape = True
            return j + 1
        self._take(data[i:j], out)
        self._abort(out, c)
        return j + 1

    def _scan_container(self, data, i, out) -> int:
        j = self._find_stop(_CONTAINER_STOP, data, i, out)
        if j is None:
            return len(data)
        c = data[j]
        if c in _RESET_BYTES:
            self._take(data[i:j], out)
            self._abort(out, c)
            return j + 1
        self._take(data[i:j + 1], out)
        if c == ord('"'):
            self._mode = _STRING
            self._in_container_string = True
        elif c in b"{[":
            self._depth += 1
            if self._depth > self.max_nesting and not self._discarding:
                self._start_discarding(
                    out, f"JSON nesting depth limit of {self.max_nesting} exceeded"
                )
        else:
            # Closers of either kind count alike; a mismatched pair such as
            # "{]" still ends the value and json.loads then reports it.
            self._depth -= 1
            if self._depth == 0:
                self._finish(out)
        return j + 1

    def _scan_bare(self, data, i, out) -> int:
        j = self._find_stop(_BARE_STOP, data, i, out)
        if j is None:
            return len(data)
        self._take(data[i:j], out)
        self._finish(out)
        # The delimiter is not part of the scalar: let the idle scanner see it.
        return j
