"""The man page docs/jobctl.1 is generated from jobctl's parser and kept up to date."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from jobctl import manpage
from jobctl.parser import build_parser

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "jobctl.1"


def test_committed_page_is_what_the_generator_prints():
    generated = subprocess.run([sys.executable, "-m", "jobctl.manpage"], capture_output=True,
                               text=True, check=True, cwd=REPO, env={"COLUMNS": "40"}).stdout
    assert generated == PAGE.read_text(), (
        "docs/jobctl.1 is stale: run `python -m jobctl.manpage > docs/jobctl.1`")


def test_page_has_every_command_and_option():
    page = manpage.render()
    for name, _, sub in manpage._subcommands(build_parser()):
        assert f"\n.SS {manpage.escape(name)}\n" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert manpage.escape(option) in page
    for option in ("\\-\\-socket", "\\-\\-overlay", "\\-\\-version", "JOBCTL_SOCKET", "OVERLAY_DIR"):
        assert option in page


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_page_renders_without_warnings():
    result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)],
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (0, "")
