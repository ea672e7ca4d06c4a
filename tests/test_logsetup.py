"""plugin/logsetup.py: log=stderr lines, with journald's priority prefix when stderr is the journal."""

import io
import logging
import os

from plugin.config import Config, ConfigError
from plugin.logsetup import stderr_handler, stderr_is_journal

import pytest


def _emit(handler, level, message, *args):
    logger = logging.Logger("plugin.jobs.engine")
    logger.addHandler(handler)
    logger.log(level, message, *args)


def test_plain_stderr_lines_are_level_logger_and_message():
    out = io.StringIO()
    _emit(stderr_handler(out, journal=False), logging.INFO,
          "Job status change job=%s from=%s to=%s", "m0", "running", "ready")
    assert out.getvalue() == "INFO plugin.jobs.engine: Job status change job=m0 from=running to=ready\n"


def test_journal_lines_carry_the_syslog_priority_on_every_line():
    out = io.StringIO()
    handler = stderr_handler(out, journal=True)
    _emit(handler, logging.WARNING, "Job failed job=%s", "m0")
    _emit(handler, logging.ERROR, "two\nlines")
    assert out.getvalue().splitlines() == ["<4>WARNING plugin.jobs.engine: Job failed job=m0",
                                           "<3>ERROR plugin.jobs.engine: two", "<3>lines"]


def test_stderr_is_the_journal_only_when_journal_stream_names_that_descriptor(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino + 1)},
                                     f.fileno())
        assert not stderr_is_journal({}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())


def test_log_key_takes_nbdkit_or_stderr_only():
    cfg = Config()
    assert cfg.log == "nbdkit"
    cfg.set("log", "stderr")
    assert cfg.log == "stderr"
    with pytest.raises(ConfigError, match="log=syslog: must be one of nbdkit, stderr"):
        cfg.set("log", "syslog")
