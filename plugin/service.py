"""The overlay service: configuration -> state directory -> store -> disk.

One instance lives in the nbdkit process; the entry script (overlaydisk.py)
forwards nbdkit's lifecycle callbacks here.  Threads (control server, jobs)
start in after_fork and are stopped and joined in cleanup.
"""

import logging
import os

from . import backends
from .config import Config, ConfigError
from .disk import statedir
from .disk.disk import Disk
from .disk.passthrough import BackendStore
from .disk.store import OverlayStore
from .jobs import factory
from .jobs.record import JobRecords, RecordError
from .jobs.registry import JobRegistry
from .qmp.block_commands import register_block_commands
from .qmp.dispatch import CommandRegistry, register_builtin_commands
from .qmp.events import EventBus
from .qmp.job_commands import register_job_commands
from .qmp.server import ControlServer

log = logging.getLogger(__name__)

BASE_CONNECTIONS = 4


class Service:
    def __init__(self):
        self.config = Config()
        self.state = None
        self.disk = None
        self.bus = EventBus()
        self.jobs = JobRegistry()
        self.records = None
        self._saved_jobs = []
        self.control = None

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
        active = self.state.active
        if active:
            # A mirror pivoted to its target: serve the target, not the overlay.
            if base:
                base.close()
            try:
                store = BackendStore(backends.open_backend(active["target"], readonly=False))
            except OSError as e:
                raise ConfigError("pivoted disk %s: %s" % (active["target"], e.strerror or e)) \
                    from None
        else:
            store = OverlayStore(self.state, base)
        self.disk = Disk(store, cfg.device, self.bus, werror=cfg.werror, rerror=cfg.rerror)
        self.records = JobRecords(self.state)
        try:
            self._saved_jobs = self.records.load_all()
        except (RecordError, OSError) as e:
            raise ConfigError(str(e)) from None
        log.info("serving device=%s size=%d overlay=%s base=%r active=%r",
                 cfg.device, store.size, cfg.overlay, base_address, active)

    def base_address(self):
        return None if self.state.active else self.state.base

    def active_target(self):
        return (self.state.active or {}).get("target")

    def io_status(self):
        return self.disk.io_status

    def resume_io(self):
        """cont: retry requests held by werror/rerror=stop (see plugin/disk/disk.py)."""
        self.disk.resume_io()

    def pivot_to(self, address):
        """Serve the mirror target from now on; called inside disk.quiesce()."""
        new = BackendStore(backends.open_backend(address, readonly=False))
        self.state.update(active={"target": address})
        old = self.disk.pivot(new)
        old.close()

    def job_context(self):
        return factory.JobContext(disk=self.disk, bus=self.bus, jobs=self.jobs,
                                  records=self.records, pivot=self.pivot_to,
                                  active_target=self.active_target)

    def start(self):
        """after_fork: restore saved jobs, then start the control server.

        Jobs come back before the control socket accepts clients (docs/jobs.md,
        "Jobs outlive the process"); their events wait in the bus's start-up
        backlog for the first clients.
        """
        saved, self._saved_jobs = self._saved_jobs, []
        if saved:
            self.bus.keep_backlog()
            factory.restore_all(self.job_context(), saved,
                                pause=self.config.job_restart == "pause")
        registry = CommandRegistry()
        register_builtin_commands(registry)
        register_job_commands(registry, self.jobs)
        register_block_commands(registry, self)
        path = self.config.control or self.state.file("control.sock")
        self.control = ControlServer(path, registry, self.bus)
        self.control.start()
        log.info("control server listening path=%s", path)

    def stop(self):
        """cleanup: save and stop the jobs (their records stay), stop the control
        server, make the disk durable, close files; within a few seconds
        whatever a job's target does (a thread blocked on it dies with the process)."""
        if self.control is not None:
            self.control.stop()
            self.control = None
        if not self.jobs.suspend_all(timeout=3.0):
            log.error("some jobs did not stop in time; their records are saved")
        if self.records is not None:
            self.records.close()
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
