"""jobctl: steer the block jobs of an overlay disk over its QMP control socket.

    jobctl [--socket PATH | --overlay STATE_DIR] COMMAND [ARGS...]

Each command opens one QMP session, does its work and exits with a
documented code (see docs/jobctl.md). Human output goes to stdout; errors
are one line on stderr: "jobctl: error: ...". Server error texts are shown
verbatim.

This module is the entry point: parse (parser.py), find the socket
(location.py), connect, run the command (commands/) and turn what went
wrong into an exit code (exitcodes.py).
"""

import logging
import os
import sys

from . import qmp_client
from .exitcodes import (EXIT_CONNECT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TIMEOUT,
                        EXIT_USAGE)
from .location import locate_socket, not_running_hint
from .options import UsageError
from .parser import parse_args
from .waiter import JobEnded, WaitTimedOut

REPLY_TIMEOUT = 30.0


def _error(message):
    print(f"jobctl: error: {message}", file=sys.stderr, flush=True)


def run(argv):
    """Parse, connect, run one command; return the exit code."""
    try:
        args = parse_args(argv)
    except UsageError as e:
        _error(str(e))
        return EXIT_USAGE
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="jobctl: %(levelname)s %(name)s %(message)s")
        # jobctl.qmp_client logs the conversation itself; qemu.qmp's own debug
        # lines (its "Connected." comes before the greeting) would only blur it.
        logging.getLogger("qemu.qmp").setLevel(logging.INFO)
    path, origin = locate_socket(args)
    if getattr(args, "standalone", None):      # metrics --listen: a session per scrape
        return args.standalone(args, path)
    try:
        with qmp_client.QMPClient(path, timeout=REPLY_TIMEOUT) as client:
            return args.func(client, args)
    except qmp_client.QMPError as e:
        _error(e.desc)
        return EXIT_FAILED
    except JobEnded as e:
        _error(str(e))
        return EXIT_FAILED
    except WaitTimedOut as e:
        _error(str(e))
        return EXIT_TIMEOUT
    except qmp_client.Timeout as e:
        _error(f"{e} (socket {path})")
        return EXIT_TIMEOUT
    except qmp_client.ServerNotRunning as e:
        _error(str(e) + not_running_hint(path, origin))
        return EXIT_CONNECT
    except qmp_client.ConnectionProblem as e:
        _error(str(e))
        return EXIT_CONNECT
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


def main(argv=None):
    """Console-script entry point."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `jobctl events -f | head`): not our error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    return code
