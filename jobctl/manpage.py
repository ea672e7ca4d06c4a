"""Write jobctl's man page (roff) from its argparse parser.

    python -m jobctl.manpage > docs/jobctl.1

The options and commands come from `build_parser()`, so the page cannot
drift from the program; the prose sections (environment, exit status,
examples) come from the constants below and from location.py's and
exitcodes.py's. A test checks that the committed docs/jobctl.1 is what this
prints. The output does not depend on the terminal, the date or the
installed version.
"""

import argparse
import sys

from . import exitcodes, location
from .parser import build_parser

# Wide enough that argparse never wraps a usage line; roff fills the text.
_USAGE_WIDTH = 10000

_DESCRIPTION = """\
jobctl steers the block jobs (mirror, stream) of an overlay disk served by
nbdkit. It talks QMP to the plugin's control socket; every command opens one
session, does its work and exits with a documented code. Human output goes
to standard output; an error is one line on standard error,
"jobctl: error: MESSAGE"; the server's error texts are shown verbatim.

Sizes (--speed, --granularity, --buf-size, set-speed) are bytes, or a number
with a binary suffix: 64K, 10M, 1.5G (10MiB, 10MB and 10M/s mean 10M). A
speed of 0 means unlimited; negative sizes are refused. JOB is a job id; a
job started without --job-id is named after its device.

Relative paths in what jobctl sends are made absolute against the current
directory, since the server's directory is not the caller's (a daemonized
nbdkit runs in /): a file TARGET of mirror, and the socket=, tls-psk-file=
and tls-certificates= parameters of NBD URIs, also in
"jobctl qmp drive-mirror".

On a terminal, the status table and the progress line of wait fit its width;
piped, the table keeps every column at its natural width."""

_ENVIRONMENT = (
    (location.SOCKET_ENV, "The control socket, when neither --socket nor --overlay is given."),
    (location.OVERLAY_ENV,
     f"A state directory: its {location.CONTROL_SOCKET_NAME} is the control socket, "
     f"when neither --socket, --overlay nor ${location.SOCKET_ENV} is given."),
)

_EXIT_STATUS = (
    (exitcodes.EXIT_OK, "Success."),
    (exitcodes.EXIT_FAILED, "The server refused the command, or the waited-on job failed, "
                            "was cancelled or does not exist."),
    (exitcodes.EXIT_USAGE, "Usage error: bad command line, bad size, qmp arguments that are "
                           "not a JSON object."),
    (exitcodes.EXIT_CONNECT, "Cannot connect to the server (not running, not a control socket, "
                             "an NBD socket), or lost the connection."),
    (exitcodes.EXIT_TIMEOUT, "Timeout: wait --timeout passed, or no reply from the server in time."),
    (exitcodes.EXIT_INTERRUPTED, "Interrupted (Ctrl-C), except for events --follow, which exits 0."),
)

_EXAMPLES = (
    ("Mirror disk0 to a file next to you, wait until it is in sync, then pivot:",
     ["jobctl --overlay /var/lib/disk0 mirror disk0 copy.img --wait",
      "jobctl --overlay /var/lib/disk0 complete disk0 --wait"]),
    ("Mirror to an NBD server on a relative socket, at most 50 MiB/s:",
     ["jobctl mirror disk0 'nbd+unix:///?socket=target.sock' --speed 50M"]),
    ("Watch every job and every event:",
     ["jobctl status", "jobctl events --follow"]),
)


def escape(text):
    """Text safe in a roff line: backslashes and minus signs escaped."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def _line(text):
    """A text line; one starting with a control character is protected."""
    text = escape(text)
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def usage(parser):
    """The parser's usage line without the "usage: " prefix, unwrapped."""
    formatter = argparse.HelpFormatter(parser.prog, width=_USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return " ".join(formatter.format_help().split())


def _subcommands(parser):
    """[(name, help, parser)] in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def _option_label(action):
    if not action.option_strings:
        return action.metavar or action.dest
    label = ", ".join(action.option_strings)
    if action.nargs != 0:
        metavar = action.metavar
        if metavar is None and action.choices:
            metavar = "{" + ",".join(map(str, action.choices)) + "}"
        label += " " + (metavar or action.dest.upper())
    return label


def _option_help(action):
    text = action.help or ""
    if action.choices and action.option_strings and action.metavar is None and not text:
        text = "One of " + ", ".join(map(str, action.choices)) + "."
    if "%(" in text:
        text = text % {"default": action.default, "prog": "jobctl"}
    return text


def _options(out, actions):
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        out.append(".TP")
        out.append("\\fB" + _line(_option_label(action)) + "\\fR")
        out.append(_line(_option_help(action)) if _option_help(action) else "\\&")


def _command(out, name, help_text, sub):
    out.append(".SS " + escape(name))
    out.append(".B " + _line(usage(sub)))
    out.append(".PP")
    out.append(_line(help_text[:1].upper() + help_text[1:] + "."))
    own = [a for a in sub._actions
           if not (a.option_strings and a.option_strings[0] in ("-h", "--socket", "--overlay"))]
    if own:
        _options(out, own)


def render(parser=None):
    """The whole man page as a string."""
    parser = parser or build_parser()
    out = [
        '.\\" Generated by "python -m jobctl.manpage" from jobctl\'s argparse parser; do not edit.',
        '.TH JOBCTL 1 "" "jobctl" "User Commands"',
        ".ad l",
        ".nh",
        ".SH NAME",
        "jobctl \\- " + escape(parser.description.rstrip(".")),
        ".SH SYNOPSIS",
        ".B jobctl",
        _line("[--socket PATH | --overlay STATE_DIR] [--debug] COMMAND [ARGS...]"),
        ".br",
        ".B jobctl",
        _line("--version | --help | COMMAND --help"),
        ".SH DESCRIPTION",
    ]
    for paragraph in _DESCRIPTION.split("\n\n"):
        out.append(".PP")
        out.extend(_line(line) for line in paragraph.splitlines())
    out.append(".SH OPTIONS")
    out.append(_line("These come before the command; --socket and --overlay may also come "
                     "after it."))
    _options(out, parser._actions)
    out.append(".SH COMMANDS")
    for name, help_text, sub in _subcommands(parser):
        _command(out, name, help_text, sub)
        for action, action_help, action_sub in _subcommands(sub):     # jobctl bitmap add
            _command(out, name + " " + action, action_help, action_sub)
    out.append(".SH ENVIRONMENT")
    for name, text in _ENVIRONMENT:
        out += [".TP", "\\fB" + escape(name) + "\\fR", _line(text)]
    out.append(".SH FILES")
    out += [".TP", "\\fB" + escape(location.CONTROL_SOCKET_NAME) + "\\fR",
            _line("The default control socket, in the current directory; the plugin's own "
                  f"default is STATE_DIR/{location.CONTROL_SOCKET_NAME}.")]
    out.append(".SH EXIT STATUS")
    for code, text in _EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _line(text)]
    out.append(".SH EXAMPLES")
    for text, commands in _EXAMPLES:
        out += [".PP", _line(text), ".PP", ".nf", ".RS"]
        out.extend(_line(command) for command in commands)
        out += [".RE", ".fi"]
    out.append(".SH SEE ALSO")
    out.append(_line("nbdkit(1), nbdkit-python-plugin(3), qemu-qmp-ref(7); docs/jobctl.md in "
                     "the source tree."))
    return "\n".join(out) + "\n"


def main():
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
