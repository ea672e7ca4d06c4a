"""jobctl: steer the block jobs of an overlay disk over its QMP control socket.

    jobctl [--socket PATH | --overlay STATE_DIR] COMMAND [ARGS...]

Each command opens one QMP session, does its work and exits with a
documented code (see docs/jobctl.md). Human output goes to stdout; errors
are one line on stderr: "jobctl: error: ...". Server error texts are shown
verbatim.
"""

import argparse
import importlib.metadata
import json
import logging
import os
import re
import sys
import time

from . import bitmap_cmd
from . import jobs as joblib
from . import paths, qmp_client
from .render import event_line, render_table, terminal_columns
from .units import parse_size
from .waiter import JobEnded, JobWaiter, WaitTimedOut, make_display

EXIT_OK = 0
EXIT_FAILED = 1        # a command was refused, or the job failed / was cancelled
EXIT_USAGE = 2         # bad command line
EXIT_CONNECT = 3       # cannot connect to, or lost, the control server
EXIT_TIMEOUT = 4       # a wait or a reply timed out
EXIT_INTERRUPTED = 130

DEFAULT_SOCKET = "control.sock"
SOCKET_ENV = "JOBCTL_SOCKET"
OVERLAY_ENV = "OVERLAY_DIR"
CONTROL_SOCKET_NAME = "control.sock"     # the plugin's default: STATE_DIR/control.sock
REPLY_TIMEOUT = 30.0
EVENTS_DURATION = 1.0

POLICIES = ("report", "ignore", "stop", "enospc", "auto")
COPY_MODES = ("background", "write-blocking")
SYNC_MODES = ("full", "top", "none")

log = logging.getLogger("jobctl")


class UsageError(Exception):
    """A bad command line; exit code 2."""


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


def _size(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return value


def build_parser():
    """The whole command line. Exposed for tests."""
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

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = command("status", "show all jobs as a table")
    p.add_argument("--json", action="store_true", help="print {\"jobs\": [...]} (stable shape)")
    p.set_defaults(func=cmd_status)

    p = command("mirror", "start a mirror (drive-mirror, mode=existing) of DEVICE to TARGET")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("target", metavar="TARGET", help="NBD URI, rbd://POOL/IMAGE?conf=PATH or file path")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--sync", choices=SYNC_MODES, default="full", help="what to copy (default: full)")
    p.add_argument("--speed", type=_size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--granularity", type=_size, help="dirty bitmap granularity, e.g. 64K")
    p.add_argument("--buf-size", type=_size, help="copy buffer size, e.g. 16M")
    p.add_argument("--on-source-error", choices=POLICIES)
    p.add_argument("--on-target-error", choices=POLICIES)
    p.add_argument("--copy-mode", choices=COPY_MODES)
    p.add_argument("--reconnect-delay", type=_delay, metavar="SECONDS",
                   help="how long a dropped target connection may stay down unnoticed "
                        "(default: the server's reconnect-delay key)")
    _add_auto_options(p)
    _add_wait_options(p, default_until="ready")
    p.set_defaults(func=cmd_mirror)

    p = command("stream", "start a stream (block-stream): copy the base into the overlay, then drop it")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--job-id", help="job id (default: DEVICE)")
    p.add_argument("--speed", type=_size, help="bytes/s limit, e.g. 10M (0: unlimited)")
    p.add_argument("--on-error", choices=POLICIES)
    _add_auto_options(p)
    _add_wait_options(p, default_until="done")
    p.set_defaults(func=cmd_stream)

    # Simple verbs: (name, QMP command, the command's job argument, help).
    for name, qmp_command, id_key, help_text in (
        ("pause", "block-job-pause", "device", "pause a job"),
        ("resume", "block-job-resume", "device", "resume a paused job (also resets io-status)"),
        ("dismiss", "block-job-dismiss", "id", "remove a concluded job (auto-dismiss off)"),
        ("finalize", "block-job-finalize", "id", "finalize a pending job (auto-finalize off)"),
    ):
        p = command(name, help_text)
        p.add_argument("job", metavar="JOB")
        p.set_defaults(func=cmd_verb, qmp_command=qmp_command, id_key=id_key)

    p = command("complete", "complete a ready mirror (pivot to the target)")
    p.add_argument("job", metavar="JOB")
    _add_end_wait_options(p)
    p.set_defaults(func=cmd_complete)

    p = command("cancel", "cancel a job (a ready mirror finishes its copy first unless --force)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--force", action="store_true", help="cancel at once, even a ready mirror")
    _add_end_wait_options(p)
    p.set_defaults(func=cmd_cancel)

    for name, qmp_command, help_text in (
        ("stop", "stop", "hold guest I/O: client requests wait until `jobctl cont` (QMP stop)"),
        ("cont", "cont", "let held guest I/O go on (QMP cont)"),
    ):
        p = command(name, help_text)
        p.set_defaults(func=cmd_simple, qmp_command=qmp_command)

    p = command("set-speed", "change a job's speed limit")
    p.add_argument("job", metavar="JOB")
    p.add_argument("speed", metavar="SPEED", type=_size, help="bytes/s, e.g. 10M (0: unlimited)")
    p.set_defaults(func=cmd_set_speed)

    p = command("set-policy", "change a running job's error policies or copy mode (block-job-change)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--on-source-error", choices=POLICIES)
    p.add_argument("--on-target-error", choices=POLICIES)
    p.add_argument("--on-error", choices=POLICIES)
    p.add_argument("--copy-mode", choices=COPY_MODES)
    p.set_defaults(func=cmd_set_policy)

    p = command("events", "print events as they arrive")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until interrupted")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--duration", type=_seconds, default=EVENTS_DURATION, metavar="SECONDS",
                   help=f"without --follow, listen this long (default: {EVENTS_DURATION:g})")
    p.set_defaults(func=cmd_events)

    p = command("wait", "wait until a job is ready or done, showing progress")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--until", choices=("ready", "done"), default="done",
                   help="ready: mirror in sync; done: job completed (default)")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="give up after this long")
    p.set_defaults(func=cmd_wait)

    bitmap_cmd.add_parser(command, common)

    p = command("qmp", "run any QMP command and print its return value as JSON")
    p.add_argument("qmp_command", metavar="CMD")
    p.add_argument("qmp_args", metavar="JSON-ARGS", nargs="?", help="arguments as a JSON object")
    p.set_defaults(func=cmd_qmp)

    return parser


def _add_auto_options(parser):
    parser.add_argument("--no-auto-finalize", action="store_true",
                        help="stop in 'pending' until `jobctl finalize`")
    parser.add_argument("--no-auto-dismiss", action="store_true",
                        help="stay 'concluded' until `jobctl dismiss`")


def _add_wait_options(parser, default_until):
    parser.add_argument("--wait", action="store_true", help="then wait like `jobctl wait`")
    parser.add_argument("--until", choices=("ready", "done"),
                        help=f"with --wait: what to wait for (default: {default_until}); implies --wait")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="with --wait: give up after this long")
    parser.set_defaults(default_until=default_until)


def _add_end_wait_options(parser):
    # Waiting on the same connection sees the end even of a job that is
    # dismissed at once (auto-dismiss), which a later `jobctl wait` cannot.
    parser.add_argument("--wait", action="store_true", help="then wait until the job has ended")
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help="with --wait: give up after this long")


def parse_args(argv):
    """Parse and check argv (without the program name); raises UsageError.

    Every usage error is found here, before connecting, so a bad command
    line exits 2 whether or not the server runs.
    """
    args = build_parser().parse_args(argv)
    if args.socket and args.overlay:
        raise UsageError("give --socket or --overlay, not both")
    if args.command == "set-policy" and not _policy_options(args):
        raise UsageError("set-policy: give at least one of --on-source-error, --on-target-error, "
                         "--on-error, --copy-mode")
    if args.command == "qmp":
        args.qmp_arguments = _json_object(args.qmp_args)
    return args


def _policy_options(args):
    options = {}
    _put(options, "on-source-error", args.on_source_error)
    _put(options, "on-target-error", args.on_target_error)
    _put(options, "on-error", args.on_error)
    _put(options, "copy-mode", args.copy_mode)
    return options


def _json_object(text):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"qmp: JSON-ARGS is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("qmp: JSON-ARGS must be a JSON object")
    return value


def version_text():
    """ "jobctl 0.1.0 (qemu.qmp 0.0.6)": this package's and its QMP library's versions."""
    return f"jobctl {_own_version()} (qemu.qmp {_distribution_version('qemu')})"


def _own_version():
    """This project's version (distribution overlay-nbd, whatever name jobctl is imported by)."""
    try:
        return importlib.metadata.version("overlay-nbd")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: not installed)"


def _distribution_version(package):
    """The version of the installed distribution providing a top-level package."""
    top = package.partition(".")[0]
    for name in importlib.metadata.packages_distributions().get(top, ()):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown: not installed)"


def locate_socket(args, environ=os.environ):
    """Return (path, origin): where the control socket is, and what said so.

    --socket, else --overlay STATE_DIR, else $JOBCTL_SOCKET, else
    $OVERLAY_DIR/control.sock, else ./control.sock.
    """
    if args.socket:
        return args.socket, "--socket"
    if args.overlay:
        return os.path.join(args.overlay, CONTROL_SOCKET_NAME), "--overlay"
    if environ.get(SOCKET_ENV):
        return environ[SOCKET_ENV], "$" + SOCKET_ENV
    if environ.get(OVERLAY_ENV):
        return os.path.join(environ[OVERLAY_ENV], CONTROL_SOCKET_NAME), "$" + OVERLAY_ENV
    return DEFAULT_SOCKET, "default"


def socket_path(args, environ=os.environ):
    """The control socket path (see locate_socket)."""
    return locate_socket(args, environ)[0]


def not_running_hint(path, origin, cwd=None):
    """Where jobctl looked and how to point it elsewhere, for "server not running"."""
    elsewhere = (f"point jobctl at the server with --socket PATH, --overlay STATE_DIR, "
                 f"{SOCKET_ENV}=PATH or {OVERLAY_ENV}=STATE_DIR")
    if origin == "--socket":
        return ""
    if origin == "default":
        cwd = os.getcwd() if cwd is None else cwd
        return f"; jobctl looked for ./{DEFAULT_SOCKET} in {cwd} (the default): {elsewhere}"
    if origin == "--overlay":
        return (f"; --overlay means STATE_DIR/{CONTROL_SOCKET_NAME}: a server started with "
                f"control=PATH needs --socket PATH")
    return f"; the path came from {origin}: {elsewhere}"


# Commands. Each takes (client, args), prints its output and returns an exit code.

def cmd_status(client, args):
    records = joblib.fetch_jobs(client)
    if args.json:
        _print_json({"jobs": records}, sort_keys=False)
    else:
        print(render_table(records, width=terminal_columns(sys.stdout)))
    return EXIT_OK


def cmd_mirror(client, args):
    arguments = {"device": args.device, "target": paths.absolute_target(args.target),
                 "mode": "existing", "sync": args.sync}
    return _start_job(client, args, "drive-mirror", arguments, (
        "job-id", "speed", "granularity", "buf-size", "on-source-error", "on-target-error",
        "copy-mode", "reconnect-delay"))


def cmd_stream(client, args):
    arguments = {"device": args.device}
    return _start_job(client, args, "block-stream", arguments, ("job-id", "speed", "on-error"))


def _start_job(client, args, command, arguments, optional):
    """Send a job-starting command with the options that were given, then wait if asked."""
    for name in optional:
        _put(arguments, name, getattr(args, name.replace("-", "_")))
    _put_auto(arguments, args)
    client.execute(command, arguments)
    return _started(client, args)


def cmd_verb(client, args):
    client.execute(args.qmp_command, {args.id_key: args.job})
    return EXIT_OK


def cmd_simple(client, args):
    client.execute(args.qmp_command)
    return EXIT_OK


def cmd_complete(client, args):
    client.execute("block-job-complete", {"device": args.job})
    if args.wait:
        return _wait(client, args.job, "done", args.timeout)
    return EXIT_OK


def cmd_cancel(client, args):
    arguments = {"device": args.job}
    if args.force:
        arguments["force"] = True
    try:
        client.execute("block-job-cancel", arguments)
    except qmp_client.QMPError as e:
        if not args.force and _is_paused(client, args.job):
            e.desc += (f" (to cancel a paused job use 'jobctl cancel --force {args.job}', "
                       f"or 'jobctl resume {args.job}' first)")
        raise
    if args.wait:
        return _wait(client, args.job, "done", args.timeout, cancel_ok=True)
    return EXIT_OK


def cmd_set_speed(client, args):
    client.execute("block-job-set-speed", {"device": args.job, "speed": args.speed})
    return EXIT_OK


def cmd_set_policy(client, args):
    client.execute("block-job-change", dict(id=args.job, **_policy_options(args)))
    return EXIT_OK


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
    return _wait(client, args.job, args.until, args.timeout)


def cmd_qmp(client, args):
    arguments = args.qmp_arguments
    if args.qmp_command == "drive-mirror" and isinstance((arguments or {}).get("target"), str):
        arguments = dict(arguments, target=paths.absolute_target(arguments["target"]))
    _print_json(client.execute(args.qmp_command, arguments))
    return EXIT_OK


def _is_paused(client, job_id):
    """True if the job is paused (by the user or by an error); False if unknown."""
    try:
        record = joblib.find_job(joblib.fetch_jobs(client), job_id)
    except (qmp_client.QMPError, qmp_client.ConnectionProblem, qmp_client.Timeout):
        return False
    return record is not None and bool(
        record["paused"] or record["status"] in ("paused", "standby"))




def _started(client, args):
    """After mirror/stream: print the job id, or wait for it."""
    # QEMU names a job after its device when no job-id is given.
    job_id = args.job_id or args.device
    if not (args.wait or args.until):
        print(job_id)
        return EXIT_OK
    return _wait(client, job_id, args.until or args.default_until, args.timeout)


def _wait(client, job_id, until, timeout, cancel_ok=False):
    waiter = JobWaiter(client, job_id, until=until, timeout=timeout, display=make_display(),
                       cancel_ok=cancel_ok)
    print(waiter.run())
    return EXIT_OK


def _delay(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("%r is not a number of seconds from 0 to 86400" % text)
    return int(value) if value == int(value) else value


def _put(arguments, key, value):
    if value is not None:
        arguments[key] = value


def _put_auto(arguments, args):
    if args.no_auto_finalize:
        arguments["auto-finalize"] = False
    if args.no_auto_dismiss:
        arguments["auto-dismiss"] = False


def _print_json(value, sort_keys=True):
    print(json.dumps(value, indent=2, sort_keys=sort_keys))


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
