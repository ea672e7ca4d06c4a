"""jobctl mirror and jobctl stream: start a job, print its id or wait for it."""

from .. import paths
from ..options import (COPY_MODES, POLICIES, SYNC_MODES, add_auto_options, add_wait_options,
                       delay, size)
from .common import start_job


def register(add_command):
    p = add_command("mirror", "start a mirror (drive-mirror, mode=existing) of DEVICE to TARGET")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("target", metavar="TARGET", help="NBD URI, rbd://POOL/IMAGE?conf=PATH or file path")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--sync", choices=SYNC_MODES + ("incremental", "bitmap"), default="full",
                   help="what to copy (default: full; incremental or bitmap with --bitmap)")
    p.add_argument("--bitmap", help="copy only this dirty bitmap's ranges and later writes: "
                                    "the target already holds the disk as it was when the "
                                    "bitmap was created or cleared")
    p.add_argument("--speed", type=size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--granularity", type=size, help="dirty bitmap granularity, e.g. 64K")
    p.add_argument("--buf-size", type=size, help="copy buffer size, e.g. 16M")
    p.add_argument("--on-source-error", choices=POLICIES)
    p.add_argument("--on-target-error", choices=POLICIES)
    p.add_argument("--copy-mode", choices=COPY_MODES)
    p.add_argument("--reconnect-delay", type=delay, metavar="SECONDS",
                   help="how long a dropped target connection may stay down unnoticed "
                        "(default: the server's reconnect-delay key)")
    add_auto_options(p)
    add_wait_options(p, default_until="ready")
    p.set_defaults(func=cmd_mirror)

    p = add_command("stream",
                    "start a stream (block-stream): copy the base into the overlay, then drop it")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--speed", type=size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--on-error", choices=POLICIES)
    add_auto_options(p)
    add_wait_options(p, default_until="done")
    p.set_defaults(func=cmd_stream)


def cmd_mirror(client, args):
    arguments = {"device": args.device, "target": paths.absolute_target(args.target),
                 "mode": "existing", "sync": args.sync}
    return start_job(client, args, "drive-mirror", arguments, (
        "job-id", "bitmap", "speed", "granularity", "buf-size", "on-source-error", "on-target-error",
        "copy-mode", "reconnect-delay"))


def cmd_stream(client, args):
    arguments = {"device": args.device}
    return start_job(client, args, "block-stream", arguments, ("job-id", "speed", "on-error"))
