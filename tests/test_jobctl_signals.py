"""Ctrl-C (SIGINT) ends jobctl with one clean line, whatever qemu.qmp was doing."""

import signal

import pytest

from test_jobctl_e2e import ControlProcess, attach_events, start_job


@pytest.fixture
def server(tmp_path):
    proc = ControlProcess(tmp_path)
    yield proc
    proc.stop()


def test_interrupted_wait_exits_130_with_one_line(server, background):
    start_job(server, steps=1000, delay=0.1)
    waiter = background(server, "wait", "j")
    assert waiter.line().startswith("j: running")      # inside its wait loop
    waiter.proc.send_signal(signal.SIGINT)
    code, _, err = waiter.finish()
    assert (code, err) == (130, "jobctl: error: interrupted\n")


def test_interrupted_events_follow_exits_0_silently(server, background):
    events = attach_events(server, background, "--follow")
    events.proc.send_signal(signal.SIGINT)
    code, _, err = events.finish()
    assert (code, err) == (0, "")
