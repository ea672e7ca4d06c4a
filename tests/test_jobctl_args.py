"""jobctl's command line: parsing, defaults and usage errors (no server needed)."""

import pytest

from jobctl.cli import UsageError, parse_args, socket_path


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
