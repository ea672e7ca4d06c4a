"""jobctl's whole command line: the global options, then one subparser per command.

The commands come from jobctl/commands/ (each module registers its own);
this module adds what every command shares and runs the checks argparse
cannot, so that every usage error is found before connecting.
"""

import argparse
import re

from . import commands
from .location import CONTROL_SOCKET_NAME, DEFAULT_SOCKET, OVERLAY_ENV, SOCKET_ENV
from .options import UsageError
from .version import version_text


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # "-5M" is a (negative) value, not an unknown option: let the value's
        # type say what is wrong with it instead of "expected one argument".
        # (Python 3.13's argparse does the same for any "-" and a digit.)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message):
        command = self.prog.partition(" ")[2]
        hint = f" (see 'jobctl {command + ' ' if command else ''}--help')"
        raise UsageError(f"{command + ': ' if command else ''}{message}{hint}")


class _VersionAction(argparse.Action):
    """--version, looked up only when asked for (it reads installed package metadata)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print jobctl's version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser():
    """The whole command line. Exposed for tests and for the man page (jobctl/manpage.py)."""
    parser = _Parser(
        prog="jobctl",
        description="Steer block jobs (mirror, stream) of an overlay disk over its QMP control socket.",
        epilog="Exit codes: 0 ok, 1 command or job failed, 2 usage, 3 cannot connect, 4 timeout.",
    )
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("--socket", metavar="PATH",
                        help=f"control socket (default: ${SOCKET_ENV}, else "
                             f"${OVERLAY_ENV}/{CONTROL_SOCKET_NAME}, else ./{DEFAULT_SOCKET})")
    parser.add_argument("--overlay", metavar="STATE_DIR",
                        help=f"the disk's state directory: use STATE_DIR/{CONTROL_SOCKET_NAME}")
    parser.add_argument("--debug", action="store_true", help="log the QMP conversation to stderr")

    # --socket and --overlay are accepted after the command too; SUPPRESS
    # keeps an absent one from overwriting a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="control socket")
    common.add_argument("--overlay", metavar="STATE_DIR", default=argparse.SUPPRESS,
                        help=f"state directory: use STATE_DIR/{CONTROL_SOCKET_NAME}")

    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True

    def add_command(name, help_text):
        return subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])

    add_command.common = common        # for commands with subcommands of their own (bitmap)

    for module in commands.MODULES:
        module.register(add_command)
    return parser


def parse_args(argv):
    """Parse and check argv (without the program name); raises UsageError.

    Every usage error is found here, before connecting, so a bad command
    line exits 2 whether or not the server runs.
    """
    args = build_parser().parse_args(argv)
    if args.socket and args.overlay:
        raise UsageError("give --socket or --overlay, not both")
    check = getattr(args, "check", None)
    if check is not None:
        check(args)
    return args
