"""QEMU's job state machine: the states, their transitions and the verb table.

Pure data and one error text; the engine (engine.py) enforces them.  See
docs/jobs.md for the same tables in prose.
"""

from ..core.errors import CommandError

# QEMU's JobSTT: state -> states it may move to.
TRANSITIONS = {
    "undefined": frozenset({"created"}),
    "created": frozenset({"running", "aborting", "null"}),
    "running": frozenset({"paused", "ready", "waiting", "aborting"}),
    "paused": frozenset({"running"}),
    "ready": frozenset({"standby", "waiting", "aborting"}),
    "standby": frozenset({"ready"}),
    "waiting": frozenset({"pending", "aborting"}),
    "pending": frozenset({"aborting", "concluded"}),
    "aborting": frozenset({"aborting", "concluded"}),
    "concluded": frozenset({"null"}),
    "null": frozenset(),
}

STATES = tuple(TRANSITIONS)

# QEMU's JobVerbTable: verb -> states in which it is accepted.
_LIVE = frozenset({"created", "running", "paused", "ready", "standby"})
VERBS = {
    "cancel": _LIVE | {"waiting", "pending"},
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
    "change": _LIVE,
}


def refused_verb_error(job_id: str, status: str, verb: str) -> CommandError:
    """QEMU's error for a verb the current state does not accept."""
    return CommandError(f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'")
