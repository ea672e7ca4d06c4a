"""jobctl backup: start a point-in-time backup (drive-backup), print its id or wait for it."""

from .. import paths
from ..options import POLICIES, add_auto_options, add_wait_options, delay, size
from .common import start_job

BACKUP_SYNC_MODES = ("full", "top", "none", "incremental", "bitmap")
EXPORT_PREFIX = "export:"


def register(add_command):
    p = add_command("backup", "start a backup (drive-backup, mode=existing) of DEVICE as it is "
                              "now to TARGET")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("target", metavar="TARGET",
                   help="NBD URI, rbd://POOL/IMAGE?conf=PATH, file path, or export:NAME "
                        "(pull mode: serve the point in time as the read-only export NAME)")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--sync", choices=BACKUP_SYNC_MODES, default="full",
                   help="what to copy (default: full)")
    p.add_argument("--bitmap", help="dirty bitmap for sync incremental or bitmap")
    p.add_argument("--bitmap-mode", choices=("on-success", "never", "always"),
                   help="what happens to the bitmap when the job ends")
    p.add_argument("--speed", type=size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--granularity", type=size,
                   help="copy-before-write granularity, e.g. 64K (default: the cluster size)")
    p.add_argument("--on-source-error", choices=POLICIES)
    p.add_argument("--on-target-error", choices=POLICIES)
    p.add_argument("--on-cbw-error", choices=("break-guest-write", "break-snapshot"))
    p.add_argument("--reconnect-delay", type=delay, metavar="SECONDS",
                   help="how long a dropped target connection may stay down unnoticed "
                        "(default: the server's reconnect-delay key)")
    add_auto_options(p)
    add_wait_options(p, default_until="done")
    p.set_defaults(func=cmd_backup)


def cmd_backup(client, args):
    target = args.target
    if not target.startswith(EXPORT_PREFIX):
        target = paths.absolute_target(target)
    arguments = {"device": args.device, "target": target, "mode": "existing",
                 "sync": args.sync}
    return start_job(client, args, "drive-backup", arguments, (
        "job-id", "bitmap", "bitmap-mode", "speed", "granularity", "on-source-error",
        "on-target-error", "on-cbw-error", "reconnect-delay"))
