"""jobctl: steer the block jobs of an overlay disk over its QMP control socket.

    jobctl [--socket PATH] COMMAND [ARGS...]

Each command opens one QMP session, does its work and exits with a
documented code (see docs/jobctl.md). Human output goes to stdout; errors
are one line on stderr: "jobctl: error: ...". Server error texts are shown
verbatim.
"""

import argparse
import json
import logging
import os
import sys
import time

from jobctl import jobs as joblib
from jobctl import qmp_client
from jobctl.render import event_line, render_table
from jobctl.units import parse_size
from jobctl.waiter import JobEnded, JobWaiter, WaitTimedOut, make_display

EXIT_OK = 0
EXIT_FAILED = 1        # a command was refused, or the job failed / was cancelled
EXIT_USAGE = 2         # bad command line
EXIT_CONNECT = 3       # cannot connect to, or lost, the control server
EXIT_TIMEOUT = 4       # a wait or a reply timed out
EXIT_INTERRUPTED = 130

DEFAULT_SOCKET = "control.sock"
SOCKET_ENV = "JOBCTL_SOCKET"
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

    def error(self, message):
        command = self.prog.partition(" ")[2]
        hint = f" (see 'jobctl {command + ' ' if command else ''}--help')"
        raise UsageError(f"{command + ': ' if command else ''}{message}{hint}")


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
    parser.add_argument("--socket", metavar="PATH",
                        help=f"control socket (default: ${SOCKET_ENV}, else ./{DEFAULT_SOCKET})")
    parser.add_argument("--debug", action="store_true", help="log the QMP conversation to stderr")

    # --socket is accepted after the command too; SUPPRESS keeps an absent
    # one from overwriting a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help="control socket")

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

    for name, qmp_command, help_text in (
        ("pause", "block-job-pause", "pause a job"),
        ("resume", "block-job-resume", "resume a paused job (also resets io-status)"),
    ):
        p = command(name, help_text)
        p.add_argument("job", metavar="JOB")
        p.set_defaults(func=cmd_verb, qmp_command=qmp_command, id_key="device")

    for name, qmp_command, help_text in (
        ("dismiss", "block-job-dismiss", "remove a concluded job (auto-dismiss off)"),
        ("finalize", "block-job-finalize", "finalize a pending job (auto-finalize off)"),
    ):
        p = command(name, help_text)
        p.add_argument("job", metavar="JOB")
        p.set_defaults(func=cmd_verb, qmp_command=qmp_command, id_key="id")

    p = command("complete", "complete a ready mirror (pivot to the target)")
    p.add_argument("job", metavar="JOB")
    _add_end_wait_options(p)
    p.set_defaults(func=cmd_complete)

    p = command("cancel", "cancel a job (a ready mirror finishes its copy first unless --force)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--force", action="store_true", help="cancel at once, even a ready mirror")
    _add_end_wait_options(p)
    p.set_defaults(func=cmd_cancel)

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


def socket_path(args, environ=os.environ):
    """--socket, else $JOBCTL_SOCKET, else ./control.sock."""
    return args.socket or environ.get(SOCKET_ENV) or DEFAULT_SOCKET


# Commands. Each takes (client, args), prints its output and returns an exit code.

def cmd_status(client, args):
    records = joblib.fetch_jobs(client)
    if args.json:
        _print_json({"jobs": records}, sort_keys=False)
    else:
        print(render_table(records))
    return EXIT_OK


def cmd_mirror(client, args):
    arguments = {"device": args.device, "target": args.target, "mode": "existing", "sync": args.sync}
    _put(arguments, "job-id", args.job_id)
    _put(arguments, "speed", args.speed)
    _put(arguments, "granularity", args.granularity)
    _put(arguments, "buf-size", args.buf_size)
    _put(arguments, "on-source-error", args.on_source_error)
    _put(arguments, "on-target-error", args.on_target_error)
    _put(arguments, "copy-mode", args.copy_mode)
    _put_auto(arguments, args)
    client.execute("drive-mirror", arguments)
    return _started(client, args)


def cmd_stream(client, args):
    arguments = {"device": args.device}
    _put(arguments, "job-id", args.job_id)
    _put(arguments, "speed", args.speed)
    _put(arguments, "on-error", args.on_error)
    _put_auto(arguments, args)
    client.execute("block-stream", arguments)
    return _started(client, args)


def cmd_verb(client, args):
    client.execute(args.qmp_command, {args.id_key: args.job})
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
    client.execute("block-job-cancel", arguments)
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
    _print_json(client.execute(args.qmp_command, args.qmp_arguments))
    return EXIT_OK


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
    path = socket_path(args)
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
    except (qmp_client.ServerNotRunning, qmp_client.ConnectionLost, qmp_client.ProtocolError) as e:
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
