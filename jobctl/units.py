"""Sizes, rates and durations: parsing what users type, formatting what they read.

Suffixes are binary, as in QEMU and nbdkit: 10M is 10 MiB (10485760 bytes).
"""

import math
import re

_MULTIPLIERS = {
    "": 1,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
    "T": 1 << 40,
    "P": 1 << 50,
    "E": 1 << 60,
}

_SIZE_RE = re.compile(
    r"""^\s*
    (?P<number>\d+(?:\.\d*)?|\.\d+)
    \s*
    (?P<suffix>[KMGTPE]?)
    (?:I?B)?              # 10M, 10MB and 10MiB all mean 10 MiB
    (?:/S)?               # a rate may say so: 10M/s
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)


def parse_size(text):
    """Return the byte count for "4096", "64K", "10M", "1.5G", "10MiB", "10M/s".

    Raises ValueError with a user-facing message for anything else,
    including negative values and fractions of a byte.
    """
    match = _SIZE_RE.match(text)
    if not match and text.strip().startswith("-"):
        raise ValueError(f"invalid size {text!r}: must not be negative")
    if not match:
        raise ValueError(f"invalid size {text!r} (examples: 4096, 64K, 10M, 1.5G)")
    number = match.group("number")
    multiplier = _MULTIPLIERS[match.group("suffix").upper()]
    if "." in number:
        value = float(number) * multiplier
        if value != math.floor(value):
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        return int(value)
    return int(number) * multiplier


_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]


def format_size(nbytes):
    """Return a short human size: "512 B", "1.5 KiB", "10.0 MiB"."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in _UNITS:
        # Compare what will be shown: 1023.99 MiB reads 1.0 GiB, not 1024.0 MiB.
        if abs(round(value, 1)) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{int(nbytes)} B"
    return f"{value:.1f} {unit}"


def format_rate(bytes_per_second):
    """Return "12.5 MiB/s"; None (unknown) is "-"."""
    if bytes_per_second is None:
        return "-"
    return f"{format_size(bytes_per_second)}/s"


def format_speed_limit(speed):
    """A job's speed limit: 0 means no limit."""
    if not speed:
        return "unlimited"
    return format_rate(speed)


def format_duration(seconds):
    """Return "0:42", "12:03" or "3:04:05" (h:mm:ss); None is "--:--"."""
    if seconds is None or seconds < 0 or math.isinf(seconds) or math.isnan(seconds):
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"
