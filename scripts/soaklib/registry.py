"""The soak's operation kinds: one small function each, registered with @op(weight).

An operation is ``fn(soak, rnd) -> str``: it does one thing to the served disk (starts a
job, sends a verb, a bitmap command, injects a fault...), using only `rnd` for its
choices, and returns what it did for the step list; ``raise Skip(why)`` when it does
not apply now.  The schedule picks operations by weight from the seed alone, so adding a
kind is adding one function here (plus its checks in the JobTrack.on_end it sets).
"""

import collections

Op = collections.namedtuple("Op", "name weight fn")
OPS = []


def op(weight):
    def register(fn):
        OPS.append(Op(fn.__name__.replace("_", "-"), weight, fn))
        return fn
    return register
