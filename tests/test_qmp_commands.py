"""CommandRegistry, the request envelope check and the built-in commands."""

import pytest

from plugin.core.errors import CommandError
from plugin.qmp.dispatch import (
    CommandRegistry,
    parse_request,
    register_builtin_commands,
)

MIRROR_SCHEMA = {
    "device": "str",
    "*speed": "int",
    "*sync": ["full", "top", "none"],
    "*force": "bool",
    "*ratio": "number",
    "*opts": "dict",
    "*anything": "any",
}


class Recorder:
    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.result


@pytest.fixture
def mirror():
    handler = Recorder({"ok": True})
    registry = CommandRegistry()
    registry.register("drive-mirror", handler, MIRROR_SCHEMA)
    return registry, handler


def rejection(registry, args, name="drive-mirror"):
    with pytest.raises(CommandError) as info:
        registry.execute(name, args)
    return info.value


# -- registry: accepted calls ----------------------------------------------

def test_handler_receives_only_the_arguments_given(mirror):
    registry, handler = mirror
    registry.execute("drive-mirror", {"device": "disk0", "speed": 5})
    assert handler.calls == [{"device": "disk0", "speed": 5}]


def test_handler_result_is_returned(mirror):
    registry, _ = mirror
    assert registry.execute("drive-mirror", {"device": "d"}) == {"ok": True}


def test_none_result_becomes_empty_object():
    registry = CommandRegistry()
    registry.register("stop", lambda: None)
    assert registry.execute("stop", {}) == {}


def test_missing_arguments_mean_no_arguments():
    registry = CommandRegistry()
    registry.register("stop", lambda: None)
    assert registry.execute("stop", None) == {}


def test_hyphenated_argument_names_reach_handler_kwargs():
    handler = Recorder()
    registry = CommandRegistry()
    registry.register("block-stream", handler, {"device": "str", "*job-id": "str"})
    registry.execute("block-stream", {"device": "d", "job-id": "j1"})
    assert handler.calls == [{"device": "d", "job-id": "j1"}]


def test_int_is_accepted_for_number(mirror):
    registry, handler = mirror
    registry.execute("drive-mirror", {"device": "d", "ratio": 3})
    assert handler.calls == [{"device": "d", "ratio": 3}]


def test_float_is_accepted_for_number(mirror):
    registry, handler = mirror
    registry.execute("drive-mirror", {"device": "d", "ratio": 0.5})
    assert handler.calls == [{"device": "d", "ratio": 0.5}]


def test_any_accepts_null(mirror):
    registry, handler = mirror
    registry.execute("drive-mirror", {"device": "d", "anything": None})
    assert handler.calls == [{"device": "d", "anything": None}]


def test_enum_accepts_allowed_value(mirror):
    registry, handler = mirror
    registry.execute("drive-mirror", {"device": "d", "sync": "top"})
    assert handler.calls == [{"device": "d", "sync": "top"}]


# -- registry: rejections, handler never called ------------------------------

@pytest.mark.parametrize("args, desc", [
    ({}, "Parameter 'device' is missing"),
    ({"device": "d", "foo": 1}, "Parameter 'foo' is unexpected"),
    ({"device": 1}, "Parameter 'device' expects str"),
    ({"device": "d", "speed": "fast"}, "Parameter 'speed' expects int"),
    ({"device": "d", "speed": True}, "Parameter 'speed' expects int"),
    ({"device": "d", "speed": 1.5}, "Parameter 'speed' expects int"),
    ({"device": "d", "force": 1}, "Parameter 'force' expects bool"),
    ({"device": "d", "ratio": False}, "Parameter 'ratio' expects number"),
    ({"device": "d", "ratio": "1"}, "Parameter 'ratio' expects number"),
    ({"device": "d", "opts": []}, "Parameter 'opts' expects dict"),
    ({"device": "d", "sync": "bogus"}, "Parameter 'sync' does not accept value 'bogus'"),
    ({"device": "d", "sync": 1}, "Parameter 'sync' expects str"),
    ({"device": None}, "Parameter 'device' expects str"),
    ({"device": "d", "speed": None}, "Parameter 'speed' expects int"),
])
def test_invalid_arguments_are_rejected_before_the_handler(mirror, args, desc):
    registry, handler = mirror
    err = rejection(registry, args)
    assert (err.cls, err.desc, handler.calls) == ("GenericError", desc, [])


def test_missing_is_reported_before_unexpected(mirror):
    registry, _ = mirror
    assert rejection(registry, {"foo": 1}).desc == "Parameter 'device' is missing"


def test_unknown_command_is_command_not_found():
    err = rejection(CommandRegistry(), {}, name="nope")
    assert (err.cls, err.desc) == ("CommandNotFound", "The command nope has not been found")


def test_qmp_error_from_handler_propagates():
    def fail():
        raise CommandError("Job 'j' not found", "DeviceNotActive")
    registry = CommandRegistry()
    registry.register("fail", fail)
    err = rejection(registry, {}, name="fail")
    assert (err.cls, err.desc) == ("DeviceNotActive", "Job 'j' not found")


def test_registering_a_name_twice_is_an_error():
    registry = CommandRegistry()
    registry.register("stop", lambda: None)
    with pytest.raises(ValueError):
        registry.register("stop", lambda: None)


def test_unknown_schema_type_is_an_error_at_registration():
    with pytest.raises(ValueError):
        CommandRegistry().register("x", lambda: None, {"a": "integer"})


def test_names_are_sorted():
    registry = CommandRegistry()
    registry.register("b", lambda: None)
    registry.register("a", lambda: None)
    assert registry.names() == ["a", "b"]


def test_allowed_before_negotiation_follows_registration():
    registry = CommandRegistry()
    registry.register("early", lambda: None, allow_before_negotiation=True)
    registry.register("late", lambda: None)
    assert [registry.allowed_before_negotiation(n) for n in ("early", "late", "nope")] == \
        [True, False, False]


def test_qmp_error_reply_shape():
    assert CommandError("boom").to_reply() == {"error": {"class": "GenericError", "desc": "boom"}}


# -- request envelope ----------------------------------------------------------

def test_full_request_is_parsed():
    assert parse_request({"execute": "x", "arguments": {"a": 1}, "id": [1]}) == \
        ("x", {"a": 1}, True, [1])


def test_minimal_request_is_parsed():
    assert parse_request({"execute": "x"}) == ("x", {}, False, None)


@pytest.mark.parametrize("msg, desc", [
    ({"arguments": {}}, "QMP input member 'execute' is missing"),
    ({}, "QMP input member 'execute' is missing"),
    ({"execute": "x", "foo": 1}, "QMP input member 'foo' is unexpected"),
    ({"execute": "x", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": 5}, "QMP input member 'execute' must be a string"),
    ({"exec-oob": "x"}, "QMP input member 'exec-oob' is unexpected"),
])
def test_bad_envelope_is_generic_error(msg, desc):
    with pytest.raises(CommandError) as info:
        parse_request(msg)
    assert (info.value.cls, info.value.desc) == ("GenericError", desc)


# -- built-ins -----------------------------------------------------------------

@pytest.fixture
def builtins():
    registry = CommandRegistry()
    register_builtin_commands(registry, version=(8, 2, 1), package="overlay-nbd 0.1")
    return registry


def test_query_version_has_qemu_shape(builtins):
    assert builtins.execute("query-version", {}) == {
        "qemu": {"major": 8, "minor": 2, "micro": 1}, "package": "overlay-nbd 0.1"}


def test_query_commands_lists_every_command(builtins):
    builtins.register("block-stream", lambda **kw: None, {"device": "str"})
    names = [c["name"] for c in builtins.execute("query-commands", {})]
    assert names == ["block-stream", "qmp_capabilities", "query-commands", "query-version"]


def test_qmp_capabilities_is_allowed_before_negotiation(builtins):
    assert builtins.allowed_before_negotiation("qmp_capabilities")


def test_qmp_capabilities_refuses_unoffered_capability(builtins):
    err = rejection(builtins, {"enable": ["oob"]}, name="qmp_capabilities")
    assert err.desc == "Capability 'oob' not available"
