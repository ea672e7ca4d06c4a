"""jobctl events and jobctl wait: watch what the server and a job do."""

import json
import time

from ..exitcodes import EXIT_OK
from ..options import seconds
from ..render import event_line
from .common import wait_for

EVENTS_DURATION = 1.0


def register(add_command):
    p = add_command("events", "print events as they arrive")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--duration", type=seconds, default=EVENTS_DURATION, metavar="SECONDS",
                   help=f"without --follow, listen this long (default: {EVENTS_DURATION:g})")
    p.set_defaults(func=cmd_events)

    p = add_command("wait", "wait until a job is ready or done, showing progress")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--until", choices=("ready", "done"), default="done",
                   help="ready: mirror in sync; done: job completed (default)")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS", help="give up after this long")
    p.set_defaults(func=cmd_wait)


def cmd_events(client, args):
    deadline = None if args.follow else time.monotonic() + args.duration
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return EXIT_OK
            event = client.next_event(timeout=remaining)
            if event is None:
                continue
            if args.json:
                print(json.dumps(event, sort_keys=True), flush=True)
            else:
                print(event_line(event), flush=True)
    except KeyboardInterrupt:
        # Interrupting --follow is the normal way to stop it.
        return EXIT_OK


def cmd_wait(client, args):
    return wait_for(client, args.job, args.until, args.timeout)
