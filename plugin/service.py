"""The overlay service: configuration -> state directory -> store -> disk.

One instance lives in the nbdkit process; the entry script (overlaydisk.py)
forwards nbdkit's lifecycle callbacks here.  Threads (control server, jobs)
start in after_fork and are stopped and joined in cleanup.
"""

import logging
import os

from plugin import backends, statedir
from plugin.config import Config, ConfigError
from plugin.disk import Disk
from plugin.store import OverlayStore

log = logging.getLogger(__name__)

BASE_CONNECTIONS = 4


class Service:
    def __init__(self):
        self.config = Config()
        self.state = None
        self.disk = None

    def configure(self, key, value):
        self.config.set(key, value)

    def open(self):
        """Open base, state directory and store (config_complete: before nbdkit forks)."""
        cfg = self.config
        cfg.check()
        remembered = _remembered_meta(cfg.overlay)
        base_address = cfg.base or (remembered or {}).get("base")
        base = None
        if base_address is not None:
            try:
                base = backends.open_backend(base_address, readonly=True,
                                             connections=BASE_CONNECTIONS)
            except OSError as e:
                raise ConfigError("base=%s: %s" % (base_address, e.strerror or e)) from None
        try:
            self.state = statedir.open_state_dir(
                cfg.overlay, base=cfg.base, size=cfg.size, cluster_size=cfg.cluster_size,
                base_size=base.size() if base else None)
        except statedir.StateError as e:
            if base:
                base.close()
            raise ConfigError(str(e)) from None
        store = OverlayStore(self.state, base)
        self.disk = Disk(store, cfg.device)
        log.info("serving device=%s size=%d overlay=%s base=%r",
                 cfg.device, store.size, cfg.overlay, base_address)

    def start(self):
        """after_fork: start background threads."""

    def stop(self):
        """cleanup: stop and join threads, make the disk durable, close files."""
        if self.disk is not None:
            try:
                self.disk.flush()
            except OSError as e:
                log.error("final flush failed error=%s", e)
            self.disk.close()
            self.disk = None
        if self.state is not None:
            self.state.close()
            self.state = None


def _remembered_meta(path):
    """meta.json of an existing state directory, else None (errors surface later)."""
    try:
        return statedir._load_meta(os.path.join(path, statedir.META))
    except (OSError, statedir.StateError):
        return None
