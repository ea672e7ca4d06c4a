"""The benchmark sections import against the current code (scripts/bench is not run in CI)."""

import importlib
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_every_section_module_imports():
    sections = importlib.import_module("benchlib.sections").SECTIONS
    assert {"overlay", "mirror", "stream", "commit", "delta", "smallio", "durable", "tls",
            "bitmaps", "backup"} <= set(sections)


@pytest.mark.parametrize("name", ["overlay", "mirror", "stream", "commit", "delta", "smallio",
                                  "durable", "tls", "bitmaps", "backup"])
def test_section_has_a_run_function(name):
    module = importlib.import_module("benchlib.sections").SECTIONS[name]
    assert callable(getattr(module, "run", None))
