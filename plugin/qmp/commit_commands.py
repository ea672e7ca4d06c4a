"""block-commit: write the overlay back into its base (plugin/jobs/commit.py).

QEMU's arguments and, where QEMU refuses something, QEMU's texts (as
qemu-storage-daemon 7.2 answers them).  The chain here has two layers, the
overlay (the device) and its base, so the arguments that pick layers may
only name those two: `top` / `top-node` the overlay (its state directory or
the device name), `base` the base's address; the base has no node name, so
`base-node` names nothing in the chain.  `backing-file` is refused as QEMU
refuses it for an active commit; `filter-node-name` is accepted and has
nothing to name (no block graph here).

A base that refuses writes (a file that cannot be opened for writing, a
read-only NBD export or RBD image) is refused before any job exists.
"""

import errno
import logging

from ..backends.nbdconnect import redact
from ..core import policy
from ..core.errors import CommandError
from ..jobs import factory

log = logging.getLogger(__name__)

# As drive-mirror's: wait this long for the base connection on the control
# thread; a connect still under way goes on in the job.
COMMAND_CONNECT_WAIT = 1.0


def register_commit_commands(registry, service):
    """Register block-commit; `service` gives disk, jobs, base_address(), job_context()."""

    def block_commit(**args):
        disk = service.disk
        device = args["device"]
        if device != disk.device:
            raise CommandError("Device '%s' not found" % device, "DeviceNotFound")
        _check_layers(args, disk.device, service.config.overlay, service.base_address())
        speed = args.get("speed", 0)
        if speed < 0:
            raise CommandError("Parameter 'speed' expects a non-negative value")
        busy = service.jobs.active_job(disk.device)
        if busy is not None:
            raise CommandError("Node '%s' is busy: block device is in use by block job: %s"
                               % (disk.device, busy.type))
        base = service.base_address()
        if disk.store.base.size() < disk.size:
            raise CommandError("Top image %s is larger than base image %s, and resize of base "
                               "image is not supported" % (disk.device, redact(base)))
        settings = {"id": args.get("job-id", disk.device), "target": base, "speed": speed}
        for name in ("on-error", "auto-finalize", "auto-dismiss"):
            if name in args:
                settings[name] = args[name]
        try:
            factory.start_commit(service.job_context(), settings,
                                 connect_wait=COMMAND_CONNECT_WAIT)
        except OSError as e:
            raise CommandError(_refused(base, e)) from None

    registry.register("block-commit", block_commit, {
        "device": "str", "*job-id": "str", "*base-node": "str", "*base": "str",
        "*top-node": "str", "*top": "str", "*backing-file": "str", "*speed": "int",
        "*on-error": list(policy.POLICIES), "*filter-node-name": "str",
        "*auto-finalize": "bool", "*auto-dismiss": "bool",
    })


def _check_layers(args, device, overlay, base):
    """QEMU's checks of top/base, in QEMU's order, for a chain of overlay and base."""
    if "top-node" in args and "top" in args:
        raise CommandError("'top-node' and 'top' are mutually exclusive")
    if "top-node" in args and args["top-node"] != device:
        raise CommandError("Cannot find device='' nor node-name='%s'" % args["top-node"])
    if "top" in args and args["top"] not in (device, overlay):
        raise CommandError("Top image file %s not found" % args["top"])
    if "base-node" in args and "base" in args:
        raise CommandError("'base-node' and 'base' are mutually exclusive")
    if base is None:
        # No backing image (standalone, or a mirror pivoted it): QEMU's text
        # for a commit whose base would be the top itself.
        raise CommandError("cannot commit an image into itself")
    if "base-node" in args:
        if args["base-node"] == device:
            raise CommandError("cannot commit an image into itself")
        raise CommandError("'%s' is not in this backing file chain" % args["base-node"])
    if "base" in args and args["base"] != base:
        raise CommandError("Can't find '%s' in the backing chain" % args["base"])
    if "backing-file" in args:
        raise CommandError("'backing-file' specified, but 'top' is the active layer")


def _refused(base, e):
    """Why the base cannot be written, as QEMU says it where it can."""
    if e.errno == errno.EROFS:
        return "Block node is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "Could not reopen file: %s" % (e.strerror or e)
    return "Could not open '%s': %s" % (redact(base), e.strerror or e)
