"""The verbs on a running job (pause ... set-policy), and stop/cont for guest I/O."""

from .. import jobs as joblib
from .. import qmp_client
from ..exitcodes import EXIT_OK
from ..options import COPY_MODES, POLICIES, UsageError, add_end_wait_options, size
from .common import put, wait_for


def register(add_command):
    # Simple verbs: (name, QMP command, the command's job argument, help).
    for name, qmp_command, id_key, help_text in (
        ("pause", "block-job-pause", "device", "pause a job"),
        ("resume", "block-job-resume", "device", "resume a paused job (also resets io-status)"),
        ("dismiss", "block-job-dismiss", "id", "remove a concluded job (auto-dismiss off)"),
        ("finalize", "block-job-finalize", "id", "finalize a pending job (auto-finalize off)"),
    ):
        p = add_command(name, help_text)
        p.add_argument("job", metavar="JOB")
        p.set_defaults(func=cmd_verb, qmp_command=qmp_command, id_key=id_key)

    p = add_command("complete", "complete a ready mirror (pivot to the target) or commit "
                                "(empty the overlay)")
    p.add_argument("job", metavar="JOB")
    add_end_wait_options(p)
    p.set_defaults(func=cmd_complete)

    p = add_command("cancel", "cancel a job (a ready mirror finishes its copy first unless --force)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--force", action="store_true", help="cancel at once, even a ready mirror")
    add_end_wait_options(p)
    p.set_defaults(func=cmd_cancel)

    for name, qmp_command, help_text in (
        ("stop", "stop", "hold guest I/O: client requests wait until `jobctl cont` (QMP stop)"),
        ("cont", "cont", "let held guest I/O go on (QMP cont)"),
    ):
        p = add_command(name, help_text)
        p.set_defaults(func=cmd_simple, qmp_command=qmp_command)

    p = add_command("set-speed", "change a job's speed limit")
    p.add_argument("job", metavar="JOB")
    p.add_argument("speed", metavar="SPEED", type=size, help="bytes/s, e.g. 10M (0: unlimited)")
    p.set_defaults(func=cmd_set_speed)

    p = add_command("set-policy",
                    "change a running job's error policies or copy mode (block-job-change)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--on-source-error", choices=POLICIES)
    p.add_argument("--on-target-error", choices=POLICIES)
    p.add_argument("--on-error", choices=POLICIES)
    p.add_argument("--copy-mode", choices=COPY_MODES)
    p.set_defaults(func=cmd_set_policy, check=_check_set_policy)


def cmd_verb(client, args):
    client.execute(args.qmp_command, {args.id_key: args.job})
    return EXIT_OK


def cmd_simple(client, args):
    client.execute(args.qmp_command)
    return EXIT_OK


def cmd_complete(client, args):
    client.execute("block-job-complete", {"device": args.job})
    if args.wait:
        return wait_for(client, args.job, "done", args.timeout)
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
        return wait_for(client, args.job, "done", args.timeout, cancel_ok=True)
    return EXIT_OK


def cmd_set_speed(client, args):
    client.execute("block-job-set-speed", {"device": args.job, "speed": args.speed})
    return EXIT_OK


def cmd_set_policy(client, args):
    client.execute("block-job-change", dict(id=args.job, **_policy_options(args)))
    return EXIT_OK


def _check_set_policy(args):
    if not _policy_options(args):
        raise UsageError("set-policy: give at least one of --on-source-error, --on-target-error, "
                         "--on-error, --copy-mode")


def _policy_options(args):
    options = {}
    put(options, "on-source-error", args.on_source_error)
    put(options, "on-target-error", args.on_target_error)
    put(options, "on-error", args.on_error)
    put(options, "copy-mode", args.copy_mode)
    return options


def _is_paused(client, job_id):
    """True if the job is paused (by the user or by an error); False if unknown."""
    try:
        record = joblib.find_job(joblib.fetch_jobs(client), job_id)
    except (qmp_client.QMPError, qmp_client.ConnectionProblem, qmp_client.Timeout):
        return False
    return record is not None and bool(
        record["paused"] or record["status"] in ("paused", "standby"))
