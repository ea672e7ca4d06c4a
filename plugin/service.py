"""The overlay service: configuration -> state directory -> store -> disk.

One instance lives in the nbdkit process; the entry script (overlaydisk.py)
forwards nbdkit's lifecycle callbacks here.  Threads (control server, jobs)
start in after_fork and are stopped and joined in cleanup.
"""

import logging
import os

from . import backends, logsetup
from .config import Config, ConfigError
from .core.procstat import OpenCount
from .disk import identity, statecheck, statedir
from .disk.bitmaps import BitmapSet
from .disk.disk import Disk
from .disk.passthrough import BackendStore
from .disk.store import OverlayStore
from .jobs import factory
from .jobs.record import JobRecords, RecordError
from .jobs.registry import JobRegistry
from .exports import ExportTable
from .qmp.backup_commands import register_backup_commands
from .qmp.bitmap_commands import register_bitmap_commands
from .qmp.block_commands import register_block_commands
from .qmp.commit_commands import register_commit_commands
from .qmp.dispatch import CommandRegistry, register_builtin_commands
from .qmp.events import EventBus
from .qmp.job_commands import register_job_commands
from .qmp.process_commands import register_process_commands
from .qmp.server import ControlServer

log = logging.getLogger(__name__)

BASE_CONNECTIONS = 4
CONTROL_SOCK = "control.sock"
DEFAULT_DEVICE = "disk0"


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
        self.exports = ExportTable()          # a pull-mode backup's view, by name
        self.connections = OpenCount()      # NBD connections (overlaydisk.open/close)
        self.transactions = None      # transaction's action table (qmp/transaction.py)

    def configure(self, key, value):
        self.config.set(key, value)

    def open(self):
        """Check and open state directory, base and store (config_complete: before nbdkit forks).

        Nothing in the state directory is opened for writing until every check
        passed (plugin/disk/statecheck.py); a failed start leaves it as it was.
        """
        cfg = self.config
        logsetup.route(cfg.log)
        cfg.check()
        try:
            statecheck.check_control(cfg.control or os.path.join(cfg.overlay, CONTROL_SOCK),
                                     given=cfg.control is not None)
        except statecheck.Damaged as e:
            raise ConfigError(str(e)) from None
        try:
            self.state, base = statedir.open_state_dir(
                cfg.overlay, lambda address: _open_base(address, cfg.reconnect_delay),
                base=cfg.base, size=cfg.size,
                cluster_size=cfg.cluster_size, device=cfg.device)
        except statedir.StateError as e:
            raise ConfigError(str(e)) from None
        active = self.state.active
        if active:
            # A mirror pivoted to its target: serve the target, not the overlay.
            try:
                store = BackendStore(backends.open_backend(
                    active["target"], readonly=False, reconnect_delay=cfg.reconnect_delay))
            except OSError as e:
                self.state.close()
                raise ConfigError("pivoted disk %s: %s" % (active["target"], e.strerror or e)) \
                    from None
        else:
            store = OverlayStore(self.state, base)
        device = cfg.device or self.state.device or DEFAULT_DEVICE
        self.disk = Disk(store, device, self.bus, werror=cfg.werror, rerror=cfg.rerror)
        try:
            self.disk.bitmaps = BitmapSet.open(self.disk, self.state.path, store.size,
                                               self.state.cluster_size)
        except (statecheck.Damaged, OSError) as e:
            raise ConfigError("dirty bitmaps: %s" % e) from None
        self.records = JobRecords(self.state)
        try:
            self._saved_jobs = self.records.load_all()
        except (RecordError, OSError) as e:
            raise ConfigError(str(e)) from None
        log.info("serving device=%s size=%d overlay=%s base=%r active=%r",
                 device, store.size, cfg.overlay, self.state.base, active)

    def base_address(self):
        return None if self.state.active else self.state.base

    def active_target(self):
        return (self.state.active or {}).get("target")

    def self_reference(self, address):
        """Why a mirror target address is this disk itself, or None (see disk/identity.py)."""
        return identity.self_reference(address, self.state.path, (
            (self.base_address(), "it is the disk's base (the base is never written)"),
            (self.active_target(), "it is the storage this disk is served from")))

    def io_status(self):
        return self.disk.io_status

    def resume_io(self):
        """cont: retry requests held by werror/rerror=stop (see plugin/disk/disk.py)."""
        self.disk.resume_io()

    def pivot_to(self, address, handle=None, reconnect_delay=0.0):
        """Serve the mirror target from now on; called inside disk.quiesce().

        handle: the job's connection to it, handed over (a server that takes
        one client at a time accepts no second connection).
        """
        new = BackendStore(backends.open_backend(address, readonly=False, handle=handle,
                                                 reconnect_delay=reconnect_delay))
        self.state.update(active={"target": address})
        old = self.disk.pivot(new)
        old.close()

    def job_context(self):
        return factory.JobContext(disk=self.disk, bus=self.bus, jobs=self.jobs,
                                  records=self.records, pivot=self.pivot_to,
                                  active_target=self.active_target,
                                  reconnect_delay=self.config.reconnect_delay,
                                  exports=self.exports,
                                  open_base=lambda address: _open_base(
                                      address, self.config.reconnect_delay))

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
        register_process_commands(registry, self.connections)
        # transaction's action table: a drive-backup action registers there too.
        self.transactions = register_bitmap_commands(registry, self)
        register_backup_commands(registry, self)      # drive-backup is a transaction action
        register_commit_commands(registry, self)
        self.disk.bitmaps.start()
        path = self.config.control or self.state.file(CONTROL_SOCK)
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
        self.jobs.close()
        if self.records is not None:
            self.records.close()
        if self.disk is not None:
            try:
                self.disk.flush()
            except OSError as e:
                log.error("final flush failed error=%s", e)
            self.disk.bitmaps.close()
            self.disk.close()
            self.disk = None
        if self.state is not None:
            self.state.close()
            self.state = None


def _open_base(address, reconnect_delay=0.0):
    return backends.open_backend(address, readonly=True, connections=BASE_CONNECTIONS,
                                 reconnect_delay=reconnect_delay)
