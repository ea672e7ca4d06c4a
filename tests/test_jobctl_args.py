"""jobctl's command line: parsing, defaults and usage errors (no server needed)."""

import pytest

from jobctl.location import socket_path
from jobctl.options import UsageError
from jobctl.parser import parse_args


def test_socket_before_command():
    assert parse_args(["--socket", "/s", "status"]).socket == "/s"


def test_socket_after_command():
    assert parse_args(["status", "--socket", "/s"]).socket == "/s"


def test_socket_defaults_to_environment_then_cwd():
    args = parse_args(["status"])
    assert socket_path(args, {"JOBCTL_SOCKET": "/env.sock"}) == "/env.sock"
    assert socket_path(args, {}) == "control.sock"


def test_socket_option_beats_environment():
    args = parse_args(["--socket", "/opt.sock", "status"])
    assert socket_path(args, {"JOBCTL_SOCKET": "/env.sock"}) == "/opt.sock"


def test_mirror_defaults():
    args = parse_args(["mirror", "disk0", "nbd://h/x"])
    assert (args.device, args.target, args.sync, args.job_id) == ("disk0", "nbd://h/x", "full", None)
    assert not args.wait and args.until is None and args.default_until == "ready"


def test_mirror_sizes_accept_suffixes():
    args = parse_args(["mirror", "d", "t", "--speed", "10M", "--granularity", "64K",
                       "--buf-size", "1M"])
    assert (args.speed, args.granularity, args.buf_size) == (10 << 20, 64 << 10, 1 << 20)


def test_mirror_policies_and_flags():
    args = parse_args(["mirror", "d", "t", "--on-source-error", "stop", "--on-target-error",
                       "enospc", "--copy-mode", "write-blocking", "--no-auto-finalize",
                       "--no-auto-dismiss", "--sync", "top"])
    assert (args.on_source_error, args.on_target_error, args.copy_mode, args.sync) == (
        "stop", "enospc", "write-blocking", "top")
    assert args.no_auto_finalize and args.no_auto_dismiss


def test_mirror_reconnect_delay_is_seconds():
    assert parse_args(["mirror", "d", "t", "--reconnect-delay", "30"]).reconnect_delay == 30
    assert parse_args(["mirror", "d", "t", "--reconnect-delay", "0.5"]).reconnect_delay == 0.5
    assert parse_args(["mirror", "d", "t"]).reconnect_delay is None
    with pytest.raises(UsageError, match="not a number of seconds"):
        parse_args(["mirror", "d", "t", "--reconnect-delay", "-3"])


def test_mirror_rejects_unknown_sync_mode():
    with pytest.raises(UsageError, match="mirror: argument --sync: invalid choice: 'bogus'"):
        parse_args(["mirror", "d", "t", "--sync", "bogus"])


def test_stream_wait_defaults_to_done():
    args = parse_args(["stream", "disk0", "--wait", "--on-error", "ignore"])
    assert args.wait and args.default_until == "done" and args.on_error == "ignore"


def test_set_speed_parses_size():
    assert parse_args(["set-speed", "j", "2M"]).speed == 2 << 20


def test_set_speed_rejects_bad_size():
    with pytest.raises(UsageError, match="invalid size"):
        parse_args(["set-speed", "j", "fast"])


def test_cancel_force_flag():
    assert parse_args(["cancel", "j", "--force"]).force
    assert not parse_args(["cancel", "j"]).force


def test_wait_defaults():
    args = parse_args(["wait", "j"])
    assert (args.until, args.timeout) == ("done", None)


def test_wait_timeout_is_seconds():
    assert parse_args(["wait", "j", "--until", "ready", "--timeout", "2.5"]).timeout == 2.5


def test_wait_rejects_negative_timeout():
    with pytest.raises(UsageError, match="must not be negative"):
        parse_args(["wait", "j", "--timeout", "-1"])


def test_events_defaults_to_short_listen():
    args = parse_args(["events"])
    assert not args.follow and not args.json and args.duration == 1.0


def test_qmp_args_optional():
    assert parse_args(["qmp", "query-version"]).qmp_args is None
    assert parse_args(["qmp", "x", '{"a": 1}']).qmp_args == '{"a": 1}'


def test_missing_command_is_usage_error():
    with pytest.raises(UsageError, match="required: COMMAND"):
        parse_args([])


def test_unknown_command_is_usage_error():
    with pytest.raises(UsageError, match="invalid choice: 'frobnicate'"):
        parse_args(["frobnicate"])


def test_usage_error_names_the_subcommand_help():
    with pytest.raises(UsageError, match=r"see 'jobctl pause --help'"):
        parse_args(["pause"])


def test_set_policy_needs_an_option():
    with pytest.raises(UsageError, match="set-policy: give at least one of"):
        parse_args(["set-policy", "j"])


def test_set_policy_choices():
    args = parse_args(["set-policy", "j", "--on-error", "stop", "--copy-mode", "background"])
    assert (args.on_error, args.copy_mode) == ("stop", "background")


def test_qmp_args_are_parsed_as_a_json_object():
    assert parse_args(["qmp", "x", '{"a": [1]}']).qmp_arguments == {"a": [1]}
    assert parse_args(["qmp", "x"]).qmp_arguments is None


@pytest.mark.parametrize("text, message", [("[1]", "must be a JSON object"),
                                           ("{nope", "not valid JSON")])
def test_qmp_args_must_be_a_json_object(text, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["qmp", "x", text])


def test_complete_and_cancel_can_wait():
    args = parse_args(["complete", "j", "--wait", "--timeout", "9"])
    assert args.wait and args.timeout == 9
    assert parse_args(["cancel", "j", "--wait"]).wait


# socket discovery

from jobctl.location import locate_socket, not_running_hint  # noqa: E402
from jobctl.version import version_text  # noqa: E402


def test_overlay_means_its_control_socket():
    assert locate_socket(parse_args(["--overlay", "/st", "status"]), {}) == (
        "/st/control.sock", "--overlay")
    assert locate_socket(parse_args(["status", "--overlay", "/st"]), {}) == (
        "/st/control.sock", "--overlay")


def test_discovery_order_socket_overlay_env_then_cwd():
    env = {"JOBCTL_SOCKET": "/env.sock", "OVERLAY_DIR": "/envdir"}
    assert locate_socket(parse_args(["--socket", "/s", "status"]), env) == ("/s", "--socket")
    assert locate_socket(parse_args(["--overlay", "/st", "status"]), env)[0] == "/st/control.sock"
    assert locate_socket(parse_args(["status"]), env) == ("/env.sock", "$JOBCTL_SOCKET")
    assert locate_socket(parse_args(["status"]), {"OVERLAY_DIR": "/envdir"}) == (
        "/envdir/control.sock", "$OVERLAY_DIR")
    assert locate_socket(parse_args(["status"]), {}) == ("control.sock", "default")


def test_socket_and_overlay_together_is_a_usage_error():
    with pytest.raises(UsageError, match="give --socket or --overlay, not both"):
        parse_args(["--socket", "/s", "--overlay", "/st", "status"])


def test_not_running_hint_says_where_jobctl_looked_and_how_to_point_elsewhere():
    hint = not_running_hint("control.sock", "default", cwd="/home/op")
    assert "./control.sock in /home/op" in hint
    for way in ("--socket PATH", "--overlay STATE_DIR", "JOBCTL_SOCKET=PATH", "OVERLAY_DIR=STATE_DIR"):
        assert way in hint
    assert "came from $JOBCTL_SOCKET" in not_running_hint("/x", "$JOBCTL_SOCKET")
    assert not_running_hint("/x", "--socket") == ""


# version, stop, cont, negative values

def test_version_names_jobctl_and_qemu_qmp(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == version_text() + "\n"
    assert out.startswith("jobctl ") and "(qemu.qmp " in out and "unknown" not in out


@pytest.mark.parametrize("command", ["stop", "cont"])
def test_stop_and_cont_send_their_qmp_command(command):
    assert parse_args([command]).qmp_command == command


@pytest.mark.parametrize("argv, option", [
    (["mirror", "d", "t", "--speed", "-5M"], "--speed"),
    (["stream", "d", "--speed", "-1"], "--speed"),
    (["mirror", "d", "t", "--granularity", "-64K"], "--granularity"),
    (["set-speed", "j", "-5M"], "SPEED"),
])
def test_negative_sizes_are_refused_clearly(argv, option):
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert f"argument {option}: invalid size '-" in str(info.value)
    assert "must not be negative" in str(info.value)
    assert "expected one argument" not in str(info.value)
