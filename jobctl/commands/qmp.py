"""jobctl qmp: run any QMP command and print its return value as JSON."""

import json

from .. import paths
from ..exitcodes import EXIT_OK
from ..options import UsageError
from .common import print_json


def register(add_command):
    p = add_command("qmp", "run any QMP command and print its return value as JSON")
    p.add_argument("qmp_command", metavar="CMD")
    p.add_argument("qmp_args", metavar="JSON-ARGS", nargs="?", help="arguments as a JSON object")
    p.set_defaults(func=cmd_qmp, check=_check_qmp)


def cmd_qmp(client, args):
    arguments = args.qmp_arguments
    if args.qmp_command == "drive-mirror" and isinstance((arguments or {}).get("target"), str):
        arguments = dict(arguments, target=paths.absolute_target(arguments["target"]))
    print_json(client.execute(args.qmp_command, arguments))
    return EXIT_OK


def _check_qmp(args):
    """JSON-ARGS must be a JSON object; parsed into args.qmp_arguments before connecting."""
    args.qmp_arguments = _json_object(args.qmp_args)


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
