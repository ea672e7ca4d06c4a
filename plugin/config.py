"""Command-line configuration of the plugin (nbdkit key=value parameters).

Every key is described in docs/plugin-keys.md; keep that page and KEYS in step.
"""

import os
import re

from .disk.statecheck import DEVICE_RE
from .backends import is_rbd_uri


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


MAX_RECONNECT_DELAY = 86400


def parse_seconds(text, what):
    """A number of seconds from 0 to a day (reconnect-delay=5, 0.5)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_RECONNECT_DELAY:
        raise ConfigError("%s=%s: must be a number of seconds from 0 to %d"
                          % (what, text, MAX_RECONNECT_DELAY))
    return value


ERROR_ACTIONS = ("report", "stop", "enospc")
# auto: a saved job comes back as it was (running, or paused); pause: user-paused.
JOB_RESTART = ("auto", "pause")
# nbdkit: nbdkit's debug stream (seen with -v); stderr: a service's journal (plugin/logsetup.py).
LOG_TARGETS = ("nbdkit", "stderr")


class Config:
    """The plugin keys, checked (a plain class: dataclasses costs start-up time)."""

    def __init__(self):
        self.overlay = None
        self.base = None
        self.size = None
        self.control = None
        self.device = None           # None: what the state directory remembers, else disk0
        self.cluster_size = None
        self.werror = "report"
        self.rerror = "report"
        self.reconnect_delay = 0.0
        self.job_restart = "auto"
        self.log = "nbdkit"

    KEYS = ("overlay", "base", "size", "control", "device", "cluster-size", "werror", "rerror",
            "reconnect-delay", "job-restart", "log")

    def set(self, key, value):
        """Take one key=value from the command line."""
        if key == "overlay":
            self.overlay = os.path.abspath(value)
        elif key == "base":
            if is_rbd_uri(value):
                from .backends.rbd import parse_uri as parse_rbd_uri   # only for Ceph
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
            if not DEVICE_RE.match(value):
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
        elif key == "reconnect-delay":
            self.reconnect_delay = parse_seconds(value, key)
        elif key == "job-restart":
            if value not in JOB_RESTART:
                raise ConfigError("job-restart=%s: must be one of %s"
                                  % (value, ", ".join(JOB_RESTART)))
            self.job_restart = value
        elif key == "log":
            if value not in LOG_TARGETS:
                raise ConfigError("log=%s: must be one of %s" % (value, ", ".join(LOG_TARGETS)))
            self.log = value
        else:
            raise ConfigError("unknown parameter %r (known: %s; see docs/plugin-keys.md)"
                              % (key, ", ".join(self.KEYS)))

    def check(self):
        if not self.overlay:
            raise ConfigError("overlay=STATE_DIR is required")
        if self.base and "://" not in self.base and not os.path.exists(self.base):
            raise ConfigError("base=%s: no such file" % self.base)
        if self.size is not None and self.size <= 0:
            raise ConfigError("size must be positive")
