"""QMP drive-backup: a point-in-time copy of the served disk (plugin/jobs/backup.py).

Arguments as QEMU's drive-backup; the target is a file path, an NBD URI, an
rbd:// address (as drive-mirror's), or `export:NAME` (pull mode: the point
in time served as the read-only export NAME on the disk's socket).
`backup_action` is the same command as a `transaction` action.
"""

import re

from ..backends.nbdconnect import redact
from ..core import policy
from ..core.errors import CommandError
from ..jobs import factory
from ..jobs.backup import EXPORT_PREFIX
from .target_paths import check_target_paths

_POLICY = list(policy.POLICIES)
COMMAND_CONNECT_WAIT = 1.0
_EXPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

SCHEMA = {
    "device": "str", "target": "str",
    "sync": ["full", "top", "none", "incremental", "bitmap"],
    "*job-id": "str", "*mode": ["existing", "absolute-paths"], "*format": ["raw"],
    "*bitmap": "str", "*bitmap-mode": ["on-success", "never", "always"],
    "*compress": "bool", "*speed": "int",
    "*on-source-error": _POLICY, "*on-target-error": _POLICY,
    "*on-cbw-error": ["break-guest-write", "break-snapshot"],
    "*auto-finalize": "bool", "*auto-dismiss": "bool", "*filter-node-name": "str",
    "*x-perf": "dict", "*reconnect-delay": "number", "*granularity": "int",
}


def check_backup(service, args):
    """QEMU's checks, before any side effect: the settings for factory.start_backup."""
    disk = service.disk
    if args["device"] != disk.device:
        raise CommandError("Cannot find device='%s' nor node-name='%s'"
                           % (args["device"], args["device"]))
    target = args["target"]
    if target.startswith(EXPORT_PREFIX):
        name = target[len(EXPORT_PREFIX):]
        if not _EXPORT_NAME.match(name) or name == disk.device:
            raise CommandError("Invalid export name '%s'" % name)
        if service.exports.get(name) is not None:
            raise CommandError("Export '%s' is already in use" % name)
    else:
        check_target_paths(target)
        why = service.self_reference(target)
        if why is not None:
            raise CommandError("Target '%s' cannot be used: %s" % (target, why))
    if args.get("mode", "existing") != "existing":
        raise CommandError("Only mode 'existing' is supported: create the target first")
    if args.get("compress"):
        raise CommandError("Compression is not supported for this target")
    sync, bitmap = args["sync"], args.get("bitmap")
    mode = args.get("bitmap-mode")
    if sync in ("incremental", "bitmap") and bitmap is None:
        raise CommandError("must provide a valid bitmap name for '%s' sync mode" % sync)
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise CommandError("Bitmap sync mode must be 'on-success' when using sync mode "
                               "'incremental'")
        sync, mode = "bitmap", "on-success"
    if bitmap is not None:
        bitmaps = disk.bitmaps
        try:
            bm = bitmaps.lookup(bitmap)
        except CommandError:
            raise CommandError("Bitmap '%s' could not be found" % bitmap) from None
        if mode is None:
            raise CommandError("Bitmap sync mode must be given when providing a bitmap")
        if bm.busy:
            raise CommandError("Bitmap '%s' is currently in use by another operation and "
                               "cannot be used" % bitmap)
        if sync == "none":
            raise CommandError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise CommandError("Bitmap sync mode 'never' has no meaningful effect when "
                               "combined with sync mode '%s'" % sync)
    elif mode is not None:
        raise CommandError("Cannot specify bitmap sync mode without a bitmap")
    speed = args.get("speed", 0)
    if speed < 0:
        raise CommandError("Parameter 'speed' expects a non-negative value")
    granularity = args.get("granularity", 0)
    if granularity and (granularity < 512 or granularity & (granularity - 1)
                        or granularity > 64 << 20):
        raise CommandError("Parameter 'granularity' expects a power of 2 in [512B, 64MB]")
    perf = args.get("x-perf") or {}
    unknown = set(perf) - {"use-copy-range", "max-workers", "max-chunk"}
    if unknown:
        raise CommandError("Parameter 'x-perf' has no member '%s'" % sorted(unknown)[0])
    max_chunk = perf.get("max-chunk", 0)
    if not isinstance(max_chunk, int) or max_chunk < 0 or (max_chunk and max_chunk < 65536):
        raise CommandError("max-chunk must be 0 or at least 65536")
    reconnect_delay = args.get("reconnect-delay", service.config.reconnect_delay)
    if not 0 <= reconnect_delay <= 86400:
        raise CommandError("Parameter 'reconnect-delay' expects a value in range [0, 86400]")
    job_id = args.get("job-id", disk.device)
    busy = service.jobs.active_job(disk.device)
    if busy is not None:
        raise CommandError("Node '%s' is busy: block device is in use by block job: %s"
                           % (disk.device, busy.type))
    settings = {"id": job_id, "target": target, "sync": sync, "speed": speed,
                "granularity": granularity or None, "reconnect-delay": reconnect_delay,
                "max-chunk": max_chunk or None, "bitmap": bitmap, "bitmap-mode": mode}
    for name in ("on-source-error", "on-target-error", "on-cbw-error", "auto-finalize",
                 "auto-dismiss"):
        if name in args:
            settings[name] = args[name]
    return settings


def register_backup_commands(registry, service):
    def drive_backup(**args):
        settings = check_backup(service, args)
        try:
            factory.start_backup(service.job_context(), settings,
                                 connect_wait=COMMAND_CONNECT_WAIT)
        except OSError as e:
            raise CommandError("Could not open '%s': %s" % (redact(args["target"]),
                                                            e.strerror or e)) from None

    registry.register("drive-backup", drive_backup, SCHEMA)

    def backup_action(ctx, data):
        """`transaction` action: the job is built (and connected) while clients are
        quiesced; commit launches it, so its point in time is taken before any
        client write, together with the other actions (a bitmap's add or clear)."""
        settings = check_backup(service, data)
        context = service.job_context()
        try:
            job = factory.prepare_backup(context, settings, connect_wait=COMMAND_CONNECT_WAIT)
        except OSError as e:
            raise CommandError("Could not open '%s': %s" % (redact(data["target"]),
                                                            e.strerror or e)) from None
        return _Launch(context, job)

    if service.transactions is not None:
        service.transactions.add("drive-backup", _ACTION_SCHEMA, backup_action,
                                 check=_check_enums, grouped=True)


# In a transaction the data is checked by transaction.check_members (scalar kinds);
# the enumerations are checked here, with QEMU's text.
_ACTION_SCHEMA = {k: ("str" if isinstance(v, list) else v) for k, v in SCHEMA.items()}


def _check_enums(data, prefix):
    for key, kind in SCHEMA.items():
        key = key.lstrip("*")
        if isinstance(kind, list) and key in data and data[key] not in kind:
            raise CommandError("Parameter '%s%s' does not accept value '%s'"
                               % (prefix, key, data[key]))


class _Launch:
    def __init__(self, context, job):
        self.context, self.job = context, job

    def commit(self):
        factory.launch(self.context, self.job)

    def abort(self):
        self.job.clean()
