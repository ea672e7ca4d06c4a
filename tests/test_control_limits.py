"""Limits of the control server (issue 9 §4): connections, descriptors, log floods, numbers.

In-process ControlServer over a real Unix socket; the same limits against a
real nbdkit are in test_control_fuzz.py.
"""

import logging

import pytest

from plugin.qmp import server as server_module
from plugin.qmp.server import ControlServer, _OncePerInterval
from plugin.qmp.wire import parse_message
from test_control_server import Env, RawClient


class SteppedClock:
    """The server's idle clock: time moves only when a test steps it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def step(self, seconds):
        self.now += seconds


@pytest.fixture
def small_env(tmp_path):
    e = Env(tmp_path, max_clients=3, clock=SteppedClock())
    e.registry.register("set-speed", lambda **a: a, {"speed": "int", "*id": "any"})
    e.server.start()
    yield e
    e.close()


def refused(client):
    """The one message of a refused connection, then EOF."""
    msg = client.recv()
    with pytest.raises(EOFError):
        client.recv()
    return msg


def test_connections_above_the_limit_get_an_error_instead_of_a_greeting(small_env):
    served = [small_env.client() for _ in range(3)]
    extra = RawClient(small_env.path)
    assert refused(extra) == {"error": {"class": "GenericError",
                                        "desc": "too many control connections (3)"}}
    assert all(c.execute("query-version")["return"]["package"] == "test-pkg" for c in served)
    served[0].close()
    small_env.clients.remove(served[0])
    assert small_env.client().execute("query-version")["return"]


def test_an_idle_connection_is_evicted_before_a_new_one_is_refused(small_env):
    """A script that leaked connections does not lock the operator out (issue 24)."""
    clock = small_env.server._clock
    leaked = [small_env.client() for _ in range(3)]
    clock.step(small_env.server.evict_idle_after)
    fresh = small_env.client()                  # a greeting, not an error
    assert fresh.execute("query-version")["return"]["package"] == "test-pkg"
    with pytest.raises(EOFError):               # the one idle longest (the first) is gone
        leaked[0].recv()
    assert all(c.execute("query-version")["return"] for c in leaked[1:])


def test_a_connection_that_never_negotiated_is_evicted_first(small_env):
    clock = small_env.server._clock
    quiet = small_env.client()                  # negotiated, then idle longest
    clock.step(1)
    silent = RawClient(small_env.path)          # never negotiates
    small_env.clients.append(silent)
    assert "QMP" in silent.recv()
    clock.step(1)
    busy = small_env.client()
    clock.step(small_env.server.evict_idle_after)
    assert busy.execute("query-version")["return"]     # input: no longer idle
    small_env.client()
    with pytest.raises(EOFError):
        silent.recv()
    assert quiet.execute("query-version")["return"]


def test_a_connection_that_sends_is_not_idle(small_env):
    clock = small_env.server._clock
    served = [small_env.client() for _ in range(3)]
    clock.step(small_env.server.evict_idle_after - 1)
    served[0].execute("query-version")
    clock.step(1)                               # 1 and 2 idle long enough, 0 not
    small_env.client()
    with pytest.raises(EOFError):
        served[1].recv()
    assert served[0].execute("query-version")["return"]
    assert served[2].execute("query-version")["return"]
    clock.step(small_env.server.evict_idle_after - 2)
    refusal = refused(RawClient(small_env.path))   # the queries above were input: none idle
    assert refusal["error"]["desc"] == "too many control connections (3)"


def test_a_message_left_unfinished_is_abandoned_with_its_connection(small_env):
    """A client that leaks its socket mid-message does not keep the buffer (issue 24)."""
    clock = small_env.server._clock
    stalled = small_env.client()
    # One send: the server reads both in one recv, so the reply proves the
    # partial message is held too.
    stalled.send(b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": ')
    assert stalled.recv()["id"] == 1
    idle = small_env.client()                   # idle, but no unfinished message
    clock.step(small_env.server.partial_timeout)
    small_env.client()                          # wakes the loop
    with pytest.raises(EOFError):
        stalled.recv()
    assert idle.execute("query-version")["return"]


def test_a_message_finished_in_time_is_answered(small_env):
    clock = small_env.server._clock
    slow = small_env.client()
    slow.send(b'{"execute": "query-version", "id": 1}{"execute": "query-version", "id": ')
    assert slow.recv()["id"] == 1
    clock.step(small_env.server.partial_timeout - 1)
    small_env.client()                          # wakes the loop
    slow.send(b"2}")
    assert slow.recv()["id"] == 2


def test_connections_are_refused_while_too_few_descriptors_remain(tmp_path):
    env = Env(tmp_path, fd_reserve=1 << 40)     # more than any RLIMIT_NOFILE
    env.server.start()
    try:
        msg = refused(RawClient(env.path))
        assert msg["error"]["class"] == "GenericError"
        assert "too few file descriptors left" in msg["error"]["desc"]
    finally:
        env.close()


def test_refusals_are_logged_once_per_interval(small_env, caplog):
    for _ in range(3):
        small_env.client()
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        for _ in range(20):
            refused(RawClient(small_env.path))
    lines = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1


def test_once_per_interval_counts_what_it_suppressed(caplog):
    now = [100.0]
    quiet = _OncePerInterval(60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=server_module.__name__):
        assert quiet.log(logging.WARNING, "k", "accept failed error=%s", "EMFILE")
        for _ in range(5):
            now[0] += 1
            assert not quiet.log(logging.WARNING, "k", "accept failed error=%s", "EMFILE")
        assert quiet.log(logging.WARNING, "other", "other thing")
        now[0] += 60
        assert quiet.log(logging.WARNING, "k", "accept failed error=%s", "EMFILE")
    texts = [r.getMessage() for r in caplog.records]
    assert texts == ["accept failed error=EMFILE", "other thing",
                     "accept failed error=EMFILE (and 5 more in the last 65s)"]


# -- numbers a command cannot take --------------------------------------------

@pytest.mark.parametrize("digits", [4300, 4301, 5000, 100000])
def test_a_number_too_long_for_a_double_is_a_json_parse_error(small_env, digits):
    c = small_env.client()
    c.send(b'{"execute": "set-speed", "arguments": {"speed": 9%s}}' % (b"9" * (digits - 1)))
    desc = c.recv()["error"]["desc"]
    assert desc.startswith("JSON parse error, number '9999") and "out of range" in desc
    assert "Exceeds" not in desc and "int_max_str_digits" not in desc and len(desc) < 120
    assert c.execute("query-version")["return"]           # still usable


@pytest.mark.parametrize("number", [b"18446744073709551616", b"-9223372036854775809",
                                    b"9" * 300, b"1.5", b"1e300"])
def test_a_number_beyond_64_bits_is_refused_where_an_int_is_expected(small_env, number):
    c = small_env.client()
    c.send(b'{"execute": "set-speed", "arguments": {"speed": %s}}' % number)
    assert c.recv() == {"error": {"class": "GenericError",
                                  "desc": "Parameter 'speed' expects int"}}


@pytest.mark.parametrize("number,value", [(b"18446744073709551615", (1 << 64) - 1),
                                          (b"-9223372036854775808", -(1 << 63)), (b"0", 0)])
def test_64_bit_integers_are_taken(small_env, number, value):
    c = small_env.client()
    c.send(b'{"execute": "set-speed", "arguments": {"speed": %s}}' % number)
    assert c.recv() == {"return": {"speed": value}}


def test_a_huge_id_is_answered_without_python_internals(small_env):
    c = small_env.client()
    c.send(b'{"execute": "query-version", "id": 1%s}' % (b"0" * 4300))
    assert c.recv()["error"]["desc"].startswith("JSON parse error, number")
    c.send(b'{"execute": "query-version", "id": 1%s}' % (b"0" * 100))
    assert c.recv()["id"] == 1e100


def test_parse_message_never_shows_the_digit_limit():
    for n in (4300, 4301, 10000):
        out = parse_message(b'{"a": %s}' % (b"7" * n))
        assert "Exceeds" not in repr(out) and "int_max_str_digits" not in repr(out)


def test_the_server_defaults_are_64_connections_and_a_descriptor_reserve(tmp_path):
    env = Env(tmp_path)
    assert env.server.max_clients == 64 and env.server.fd_reserve >= 64
    assert isinstance(env.server, ControlServer)
