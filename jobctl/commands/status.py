"""jobctl status: every job as a table, or as JSON."""

import sys

from .. import jobs as joblib
from ..exitcodes import EXIT_OK
from ..render import render_table, terminal_columns
from .common import print_json


def register(add_command):
    p = add_command("status", "show all jobs as a table")
    p.add_argument("--json", action="store_true", help="print {\"jobs\": [...]} (stable shape)")
    p.set_defaults(func=cmd_status)


def cmd_status(client, args):
    records = joblib.fetch_jobs(client)
    if args.json:
        print_json({"jobs": records}, sort_keys=False)
    else:
        print(render_table(records, width=terminal_columns(sys.stdout)))
    return EXIT_OK
