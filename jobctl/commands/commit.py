"""jobctl commit: write the overlay back into its base (block-commit)."""

import sys

from ..exitcodes import EXIT_OK
from ..options import POLICIES, add_auto_options, add_wait_options, size
from ..waiter import JobWaiter, make_display
from .common import print_json, put, put_auto, start_job

_OPTIONAL = ("job-id", "speed", "on-error")


def register(add_command):
    p = add_command("commit", "commit DEVICE's overlay into its base (block-commit); "
                              "`jobctl complete` then empties the overlay")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--speed", type=size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--on-error", choices=POLICIES,
                   help="error policy for reads and writes (default: report)")
    add_auto_options(p)
    add_wait_options(p, default_until="ready")
    p.add_argument("--json", action="store_true",
                   help='print {"id": ID}; with --wait also "result": "ready" or "completed" '
                        "(progress goes to stderr)")
    p.set_defaults(func=cmd_commit)


def cmd_commit(client, args):
    arguments = {"device": args.device}
    if not args.json:
        return start_job(client, args, "block-commit", arguments, _OPTIONAL)
    for name in _OPTIONAL:
        put(arguments, name, getattr(args, name.replace("-", "_")))
    put_auto(arguments, args)
    client.execute("block-commit", arguments)
    job_id = args.job_id or args.device
    result = {"id": job_id}
    if args.wait or args.until:
        waiter = JobWaiter(client, job_id, until=args.until or args.default_until,
                           timeout=args.timeout, display=make_display(sys.stderr))
        summary = waiter.run()
        result["result"] = "ready" if summary.endswith("is ready") else "completed"
    print_json(result)
    return EXIT_OK
