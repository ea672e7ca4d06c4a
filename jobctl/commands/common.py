"""Helpers the command modules share: QMP arguments from options, JSON output, waiting."""

import json

from ..exitcodes import EXIT_OK
from ..waiter import JobWaiter, make_display


def put(arguments, key, value):
    """Set arguments[key] to an option's value, unless the option was not given."""
    if value is not None:
        arguments[key] = value


def put_auto(arguments, args):
    """auto-finalize / auto-dismiss from options.add_auto_options."""
    if args.no_auto_finalize:
        arguments["auto-finalize"] = False
    if args.no_auto_dismiss:
        arguments["auto-dismiss"] = False


def print_json(value, sort_keys=True):
    print(json.dumps(value, indent=2, sort_keys=sort_keys))


def start_job(client, args, command, arguments, optional):
    """Send a job-starting command with the options that were given, then wait if asked.

    `optional` names the QMP arguments taken from same-named options when
    given ("buf-size" from args.buf_size); the parser has the options of
    options.add_auto_options and options.add_wait_options, and DEVICE and --job-id.
    """
    for name in optional:
        put(arguments, name, getattr(args, name.replace("-", "_")))
    put_auto(arguments, args)
    client.execute(command, arguments)
    # QEMU names a job after its device when no job-id is given.
    job_id = args.job_id or args.device
    if not (args.wait or args.until):
        print(job_id)
        return EXIT_OK
    return wait_for(client, job_id, args.until or args.default_until, args.timeout)


def wait_for(client, job_id, until, timeout, cancel_ok=False):
    """Wait until the job is ready or done, showing progress; print how it ended.

    Raises waiter.JobEnded or waiter.WaitTimedOut, which jobctl/cli.py reports.
    """
    waiter = JobWaiter(client, job_id, until=until, timeout=timeout, display=make_display(),
                       cancel_ok=cancel_ok)
    print(waiter.run())
    return EXIT_OK
