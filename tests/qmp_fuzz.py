"""Fuzzed input for the QMP control socket: a reproducible stream of messages.

``messages(seed, n)`` yields n byte strings: valid commands with random
arguments, random JSON values, garbage bytes, huge numbers, deep nesting,
partial messages (a value cut short and then reset with a newline, as a client
would recover).  Nothing here may start a job or change the disk: commands are
drawn from the read-only ones, and drive-mirror/block-stream only with a
device that does not exist.
"""

import json
import random

SAFE_COMMANDS = ["query-version", "query-commands", "query-block-jobs", "query-jobs",
                 "query-block", "query-status", "qmp_capabilities", "no-such-command",
                 "block-job-cancel", "block-job-pause", "block-job-resume",
                 "block-job-complete", "job-dismiss", "block-job-set-speed"]
NO_DEVICE = "fuzz-no-such-device"


def _value(rnd, depth=0):
    kind = rnd.randrange(9 if depth < 4 else 5)
    if kind == 0:
        return rnd.randrange(-2 ** 70, 2 ** 70)
    if kind == 1:
        return rnd.random() * 10 ** rnd.randrange(-5, 300)
    if kind == 2:
        return "".join(chr(rnd.randrange(1, 0x3000)) for _ in range(rnd.randrange(20)))
    if kind == 3:
        return rnd.choice([True, False, None])
    if kind == 4:
        return rnd.choice(["", NO_DEVICE, "disk0", "x" * rnd.randrange(1000)])
    if kind in (5, 6):
        return [_value(rnd, depth + 1) for _ in range(rnd.randrange(5))]
    return {rnd.choice(["device", "job-id", "speed", "id", "force", "x", "target", "sync"]):
            _value(rnd, depth + 1) for _ in range(rnd.randrange(5))}


def _command(rnd):
    msg = {"execute": rnd.choice(SAFE_COMMANDS)}
    if rnd.random() < 0.7:
        args = _value(rnd, 2) if rnd.random() < 0.2 else {
            "device": NO_DEVICE, "id": _value(rnd, 3), "speed": _value(rnd, 3)}
        msg["arguments"] = args
    if rnd.random() < 0.5:
        msg["id"] = _value(rnd, 3)
    return json.dumps(msg).encode()


def _garbage(rnd):
    return bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))


def _huge_number(rnd):
    digits = rnd.choice([20, 400, 4300, 4301, 5000, 100000])
    number = str(rnd.randrange(1, 10)) + "".join(str(rnd.randrange(10)) for _ in range(digits - 1))
    where = rnd.randrange(3)
    if where == 0:
        return b'{"execute": "query-version", "id": %s}' % number.encode()
    if where == 1:
        return (b'{"execute": "block-job-set-speed", "arguments": {"device": "%s", "speed": %s}}'
                % (NO_DEVICE.encode(), number.encode()))
    return number.encode() + b" "


def _deep(rnd):
    depth = rnd.choice([100, 255, 257, 1000, 20000])
    opener, closer = rnd.choice([(b"[", b"]"), (b'{"a":', b"}")])
    return opener * depth + b"1" + closer * depth


def _partial(rnd):
    whole = _command(rnd)
    return whole[:rnd.randrange(1, len(whole))] + b"\x00"     # a reset byte: resynchronise


def _dup_keys(rnd):
    return b'{"execute": "query-version", "execute": "query-version"}'


KINDS = [(_command, 40), (lambda rnd: json.dumps(_value(rnd)).encode(), 15), (_garbage, 15),
         (_huge_number, 10), (_deep, 5), (_partial, 10), (_dup_keys, 5)]


def messages(seed, n):
    rnd = random.Random(seed)
    makers = [m for m, w in KINDS for _ in range(w)]
    for _ in range(n):
        yield rnd.choice(makers)(rnd)
