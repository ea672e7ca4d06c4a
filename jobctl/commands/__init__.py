"""jobctl's commands: one module per family, listed in MODULES in `jobctl --help` order.

A command module has `register(add_command)`. For each of its commands it
calls `add_command(name, help_text)`, which returns the command's argparse
subparser (already taking --socket and --overlay), adds the command's
arguments (shared ones are in jobctl/options.py) and sets with set_defaults:

- `func(client, args)`: does the work over the QMP client (jobctl/qmp_client.py),
  prints the output and returns an exit code (jobctl/exitcodes.py); a refused
  command raises qmp_client.QMPError, which jobctl/cli.py reports;
- optionally `check(args)`: runs after parsing, before connecting, and raises
  options.UsageError for what argparse cannot check.

To add a command: write its module here and list it in MODULES.
"""

from .. import bitmap_cmd, metrics_cli
from . import backup, commit, qmp, start, status, verbs, watch

MODULES = (status, start, backup, commit, verbs, watch, bitmap_cmd, qmp, metrics_cli)
