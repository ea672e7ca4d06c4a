"""QMP commands about the served disk: drive-mirror, block-stream, query-block, stop/cont.

Handlers check the arguments QEMU's way, build the job and start it; the job
engine (plugin/jobs/engine.py) and the jobs do the rest.  Arguments keep QEMU's
spelling (job-id, buf-size), so handlers take **args.
"""

import logging

from ..backends.nbdconnect import redact
from ..core import policy
from ..core.errors import CommandError
from ..jobs import factory
from .target_paths import check_target_paths

log = logging.getLogger(__name__)

_POLICY = list(policy.POLICIES)

# drive-mirror waits this long for the target connection on the control
# thread; a connect still under way then goes on in the job, which fails if
# it does not succeed (so a target that never answers freezes nothing).
COMMAND_CONNECT_WAIT = 1.0


def _power_of_two(n):
    return n > 0 and not n & (n - 1)


def register_block_commands(registry, service):
    """Register the disk's commands; `service` gives disk, jobs, bus, pivot_to()."""

    def find_device(device):
        if device != service.disk.device:
            raise CommandError("Cannot find device='%s' nor node-name='%s'" % (device, device))
        return service.disk

    def drive_mirror(**args):
        disk = find_device(args["device"])
        check_target_paths(args["target"])
        if args.get("mode", "existing") != "existing":
            raise CommandError("Only mode 'existing' is supported: create the target first")
        granularity = args.get("granularity", 0)
        if granularity and not (512 <= granularity <= 64 << 20):
            raise CommandError("Parameter 'granularity' expects a value in range [512B, 64MB]")
        if granularity and not _power_of_two(granularity):
            raise CommandError("Parameter 'granularity' expects a power of 2")
        buf_size = args.get("buf-size", 0)
        if buf_size < 0:
            raise CommandError("Parameter 'buf-size' expects a positive value")
        speed = args.get("speed", 0)
        if speed < 0:
            raise CommandError("Parameter 'speed' expects a non-negative value")
        reconnect_delay = args.get("reconnect-delay", service.config.reconnect_delay)
        if not 0 <= reconnect_delay <= 86400:
            raise CommandError("Parameter 'reconnect-delay' expects a value in range [0, 86400]")
        why = service.self_reference(args["target"])
        if why is not None:
            raise CommandError("Target '%s' cannot be used: %s" % (args["target"], why))
        job_id = args.get("job-id", disk.device)
        busy = service.jobs.active_job(disk.device)
        if busy is not None:
            raise CommandError("Node '%s' is busy: block device is in use by block job: %s"
                           % (disk.device, busy.type))
        sync, bitmap = args["sync"], args.get("bitmap")
        if sync in ("incremental", "bitmap"):
            if bitmap is None:
                raise CommandError("must provide a valid bitmap name for '%s' sync mode" % sync)
            try:
                held = disk.bitmaps.lookup(bitmap)
            except CommandError:
                raise CommandError("Bitmap '%s' could not be found" % bitmap) from None
            if held.busy:
                raise CommandError("Bitmap '%s' is currently in use by another operation and "
                                   "cannot be used" % bitmap)
        elif bitmap is not None:
            raise CommandError("Sync mode '%s' not supported with bitmap" % sync)
        settings = {"id": job_id, "target": args["target"], "sync": args["sync"],
                    "bitmap": bitmap,
                    "granularity": granularity or None, "buf-size": buf_size or None,
                    "speed": speed, "reconnect-delay": reconnect_delay}
        for name in ("on-source-error", "on-target-error", "copy-mode", "auto-finalize",
                     "auto-dismiss", "target-is-zero"):
            if name in args:
                settings[name] = args[name]
        try:
            factory.start_mirror(service.job_context(), settings,
                                 connect_wait=COMMAND_CONNECT_WAIT)
        except OSError as e:
            raise CommandError("Could not open '%s': %s" % (redact(args["target"]),
                                                            e.strerror or e)) from None

    registry.register("drive-mirror", drive_mirror, {
        "device": "str", "target": "str",
        "sync": ["full", "top", "none", "incremental", "bitmap"], "*bitmap": "str",
        "*job-id": "str", "*mode": ["existing", "absolute-paths"], "*format": ["raw"],
        "*speed": "int", "*granularity": "int", "*buf-size": "int",
        "*on-source-error": _POLICY, "*on-target-error": _POLICY,
        "*copy-mode": ["background", "write-blocking"],
        "*auto-finalize": "bool", "*auto-dismiss": "bool", "*unmap": "bool",
        "*reconnect-delay": "number", "*target-is-zero": "bool",
    })

    def block_stream(**args):
        disk = find_device(args["device"])
        if service.active_target() is not None:
            raise CommandError("Device '%s' has no backing file: a mirror pivoted it to %s"
                           % (disk.device, service.active_target()))
        base = service.base_address()
        if base is None:
            raise CommandError("Device '%s' has no backing file" % disk.device)
        # The chain has one backing image: 'base' may only name it (and streams it all).
        if "base" in args and args["base"] != base:
            raise CommandError("Can't find '%s' in the backing chain" % args["base"])
        busy = service.jobs.active_job(disk.device)
        if busy is not None:
            raise CommandError("Node '%s' is busy: block device is in use by block job: %s"
                           % (disk.device, busy.type))
        settings = {"id": args.get("job-id", disk.device), "speed": args.get("speed", 0)}
        for name in ("on-error", "auto-finalize", "auto-dismiss"):
            if name in args:
                settings[name] = args[name]
        factory.start_stream(service.job_context(), settings)

    registry.register("block-stream", block_stream, {
        "device": "str", "*job-id": "str", "*base": "str", "*speed": "int",
        "*on-error": _POLICY, "*auto-finalize": "bool", "*auto-dismiss": "bool",
    })

    def query_block():
        disk = service.disk
        info = {
            "device": disk.device,
            "size": disk.size,
            "base": service.base_address(),
            "active": service.active_target(),
            "overlay": service.config.overlay,
            "allocation": disk.store.allocation(),
            "io-status": service.io_status(),
            "held": disk.held,
            "x-held-requests": disk.held_requests,
            "dirty-bitmaps": disk.bitmaps.info(),
        }
        return [info]

    registry.register("query-block", query_block)

    def stop():
        service.disk.hold()

    def cont():
        service.disk.release()
        service.resume_io()

    def query_status():
        held = service.disk.held
        return {"running": not held, "status": "paused" if held else "running"}

    registry.register("stop", stop)
    registry.register("cont", cont)
    registry.register("query-status", query_status)
