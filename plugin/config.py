"""Command-line configuration of the plugin (nbdkit key=value parameters)."""

import dataclasses
import os
import re

from .backends import is_rbd_uri
from .backends.rbd import parse_uri as parse_rbd_uri


class ConfigError(Exception):
    """Bad configuration; the message is one clear line for the operator."""


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*$")
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text, what="size"):
    """Parse 1048576, 64K, 1M, 2G, 1TiB... (binary units, as nbdkit and QEMU)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError("%s=%s: not a size (use e.g. 1048576, 64K, 10G)" % (what, text))
    return int(m.group(1)) << (10 * _UNITS[m.group(2).lower()])


ERROR_ACTIONS = ("report", "stop", "enospc")


@dataclasses.dataclass
class Config:
    overlay: str = None
    base: str = None
    size: int = None
    control: str = None
    device: str = "disk0"
    cluster_size: int = None
    werror: str = "report"
    rerror: str = "report"

    KEYS = ("overlay", "base", "size", "control", "device", "cluster-size", "werror", "rerror")

    def set(self, key, value):
        """Take one key=value from the command line."""
        if key == "overlay":
            self.overlay = os.path.abspath(value)
        elif key == "base":
            if is_rbd_uri(value):
                try:
                    parse_rbd_uri(value)
                except ValueError as e:
                    raise ConfigError("base=%s: %s" % (value, e)) from None
            self.base = value if "://" in value else os.path.abspath(value)
        elif key == "size":
            self.size = parse_size(value, "size")
        elif key == "control":
            self.control = os.path.abspath(value)
        elif key == "device":
            if not re.match(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$", value):
                raise ConfigError("device=%s: use a letter then letters, digits, '_', '.', '-'" % value)
            self.device = value
        elif key == "cluster-size":
            cs = parse_size(value, "cluster-size")
            if cs < 4096 or cs > 2 << 20 or cs & (cs - 1):
                raise ConfigError("cluster-size=%s: must be a power of 2 from 4K to 2M" % value)
            self.cluster_size = cs
        elif key in ("werror", "rerror"):
            if value not in ERROR_ACTIONS:
                raise ConfigError("%s=%s: must be one of %s" % (key, value, ", ".join(ERROR_ACTIONS)))
            setattr(self, key, value)
        else:
            raise ConfigError("unknown parameter %r (known: %s)" % (key, ", ".join(self.KEYS)))

    def check(self):
        if not self.overlay:
            raise ConfigError("overlay=STATE_DIR is required")
        if self.base and "://" not in self.base and not os.path.exists(self.base):
            raise ConfigError("base=%s: no such file" % self.base)
        if self.size is not None and self.size <= 0:
            raise ConfigError("size must be positive")
