"""The pieces of jobctl's command line that several commands share.

UsageError, the value types (sizes, seconds, a reconnect delay), the choice
lists, and the option groups that job-starting and job-ending commands have in
common. Nothing here knows which commands exist (jobctl/parser.py does).
"""

import argparse

from .units import parse_size

POLICIES = ("report", "ignore", "stop", "enospc", "auto")
COPY_MODES = ("background", "write-blocking")
SYNC_MODES = ("full", "top", "none")


class UsageError(Exception):
    """A bad command line; exit code 2."""


def size(text):
    """An argparse type: bytes, or a number with a binary suffix (jobctl.units)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds(text):
    """An argparse type: a non-negative number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return value


def delay(text):
    """An argparse type: 0 to 86400 seconds, an int when whole (as QMP's reconnect-delay)."""
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("%r is not a number of seconds from 0 to 86400" % text)
    return int(value) if value == int(value) else value


def add_auto_options(parser):
    """--no-auto-finalize and --no-auto-dismiss, for a command that starts a job."""
    parser.add_argument("--no-auto-finalize", action="store_true",
                        help="stop in 'pending' until `jobctl finalize`")
    parser.add_argument("--no-auto-dismiss", action="store_true",
                        help="stay 'concluded' until `jobctl dismiss`")


def add_wait_options(parser, default_until):
    """--wait, --until and --timeout, for a command that starts a job (commands.common.started)."""
    parser.add_argument("--wait", action="store_true", help="then wait like `jobctl wait`")
    parser.add_argument("--until", choices=("ready", "done"),
                        help=f"with --wait: what to wait for (default: {default_until}); implies --wait")
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="with --wait: give up after this long")
    parser.set_defaults(default_until=default_until)


def add_end_wait_options(parser):
    """--wait and --timeout, for a command that ends a job (complete, cancel)."""
    # Waiting on the same connection sees the end even of a job that is
    # dismissed at once (auto-dismiss), which a later `jobctl wait` cannot.
    parser.add_argument("--wait", action="store_true", help="then wait until the job has ended")
    parser.add_argument("--timeout", type=seconds, metavar="SECONDS",
                        help="with --wait: give up after this long")
