"""Where the plugin's log lines go (plugin key `log=`, docs/logs.md).

nbdkit (the default): through nbdkit's debug stream, printed only when nbdkit
runs with -v, which also prints a line for every request: right for a
developer, wrong for a service.

stderr: one line per record on standard error, which a systemd service sends
to the journal.  When stderr is the journal (systemd sets JOURNAL_STREAM to
its device:inode) each line starts with its syslog priority, `<6>` for info,
which journald takes off and keeps as the entry's priority, so
`journalctl -p warning` finds warnings and errors.
"""

import logging
import os
import sys

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _JournalFormatter(logging.Formatter):
    """Every line of a record gets the priority prefix (a traceback has many)."""

    def format(self, record):
        prefix = "<%d>" % _PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(environ=os.environ, fd=2):
    """True if fd is the journal stream systemd connected (JOURNAL_STREAM=DEV:INODE)."""
    dev, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(inode))
    except (OSError, ValueError):
        return False


def stderr_handler(stream=None, journal=None):
    """A handler writing one line per record to stream (stderr)."""
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = stderr_is_journal()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JournalFormatter(_FORMAT) if journal else logging.Formatter(_FORMAT))
    return handler


def route(target):
    """Send the root logger's records to `target` (config.LOG_TARGETS).

    nbdkit keeps the handler the entry script installed; stderr replaces it.
    """
    if target == "stderr":
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(stderr_handler())
