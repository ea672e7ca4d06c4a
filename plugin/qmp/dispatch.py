"""QMP command dispatch: the request envelope, argument validation, built-ins.

This layer knows nothing about sockets or sessions (see ``session.py``):
it turns a decoded request into ``(name, args, id)``, checks arguments
against a small QAPI-like schema *before* any handler runs, and calls the
handler.  Errors are ``CommandError`` (plugin/core/errors.py) carrying QEMU's error class and text, so
the transport can answer ``{"error": {"class", "desc"}}``.

Argument schemas map a name to a type; a leading ``*`` marks it optional::

    {"device": "str", "*speed": "int", "*sync": ["full", "top", "none"]}

Types: ``str``, ``int`` (``bool`` is not an int), ``bool``, ``number`` (int
or float), ``dict``, ``list``, ``any``, or a list of allowed strings (an
enum).  Argument names keep QEMU's spelling (``job-id``), so handlers that
take such names receive them through ``**kwargs``.
"""

from __future__ import annotations

import logging

from ..core.errors import CommandError

log = logging.getLogger(__name__)

_SCALAR_TYPES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


def parse_request(msg: dict) -> tuple[str, dict, bool, object]:
    """Check the request envelope {"execute": str, "arguments"?: dict, "id"?: any}.

    Returns ``(name, arguments, has_id, id)``.  Raises CommandError(GenericError)
    with QEMU's texts for a missing or mistyped member or an unexpected one.
    The caller should still echo ``msg["id"]`` on that error when present.
    """
    for key, value in msg.items():
        if key == "execute":
            if not isinstance(value, str):
                raise CommandError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise CommandError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise CommandError(f"QMP input member '{key}' is unexpected")
    if "execute" not in msg:
        raise CommandError("QMP input member 'execute' is missing")
    return msg["execute"], msg.get("arguments", {}), "id" in msg, msg.get("id")


class _Command:
    __slots__ = ("name", "handler", "members", "allow_before_negotiation")

    def __init__(self, name, handler, schema, allow_before_negotiation):
        self.name = name
        self.handler = handler
        self.allow_before_negotiation = allow_before_negotiation
        # (name, type, optional) in declaration order: like QEMU, arguments
        # are checked member by member in schema order, then extras.
        self.members: list[tuple[str, object, bool]] = []
        for key, kind in schema.items():
            _check_schema_type(name, key, kind)
            optional = key.startswith("*")
            self.members.append((key[1:] if optional else key, kind, optional))


def _check_schema_type(command, key, kind):
    """Reject a bad schema at registration time, not at the first request."""
    if isinstance(kind, list):
        if not kind or not all(isinstance(v, str) for v in kind):
            raise ValueError(f"command={command} arg={key}: enum must be a list of strings")
    elif kind not in _SCALAR_TYPES:
        raise ValueError(f"command={command} arg={key}: unknown type {kind!r}")


def _check_value(key, kind, value):
    if isinstance(kind, list):
        if not isinstance(value, str):
            raise CommandError(f"Parameter '{key}' expects str")
        if value not in kind:
            raise CommandError(f"Parameter '{key}' does not accept value '{value}'")
    elif not _SCALAR_TYPES[kind](value):
        raise CommandError(f"Parameter '{key}' expects {kind}")


class CommandRegistry:
    """The set of QMP commands a server offers, with their argument schemas."""

    def __init__(self):
        self._commands: dict[str, _Command] = {}

    def register(self, name: str, handler, args: dict | None = None,
                 allow_before_negotiation=False) -> None:
        """Add a command; ``handler(**args)`` gets only the arguments given.

        Missing required args, unknown args, wrong types and bad enum values
        are rejected with CommandError(GenericError) before the handler runs.
        The handler returns a JSON-serialisable value (None means {}).
        Registering a name twice is a programming error (ValueError).
        """
        if name in self._commands:
            raise ValueError(f"command={name} is already registered")
        self._commands[name] = _Command(name, handler, args or {}, allow_before_negotiation)

    def names(self) -> list[str]:
        """Registered command names, sorted."""
        return sorted(self._commands)

    def allowed_before_negotiation(self, name: str) -> bool:
        """Whether ``name`` may run before qmp_capabilities (unknown: False)."""
        command = self._commands.get(name)
        return command is not None and command.allow_before_negotiation

    def validate(self, name: str, args: dict | None) -> dict:
        """Check ``args`` for command ``name``; returns them or raises CommandError."""
        command = self._commands.get(name)
        if command is None:
            raise CommandError(f"The command {name} has not been found", "CommandNotFound")
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise CommandError("QMP input member 'arguments' must be an object")
        known = set()
        for key, kind, optional in command.members:
            known.add(key)
            if key in args:
                _check_value(key, kind, args[key])
            elif not optional:
                raise CommandError(f"Parameter '{key}' is missing")
        for key in args:
            if key not in known:
                raise CommandError(f"Parameter '{key}' is unexpected")
        return args

    def execute(self, name: str, args: dict | None) -> object:
        """Validate then call the handler; returns its result ({} for None).

        Raises CommandError for validation failures and whatever the handler
        raises (the transport turns non-CommandError exceptions into
        GenericError replies).
        """
        args = self.validate(name, args)
        result = self._commands[name].handler(**args)
        return {} if result is None else result


def _qmp_capabilities(enable=None):
    # The session state (negotiated or not) lives in session.py; the
    # command itself only refuses capabilities we never offer.
    for capability in enable or []:
        raise CommandError(f"Capability '{capability}' not available")
    return {}


def register_builtin_commands(registry: CommandRegistry, version=(0, 1, 0),
                              package: str = "overlay-nbd") -> None:
    """Register qmp_capabilities, query-version and query-commands."""
    major, minor, micro = version

    def query_version():
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": package}

    def query_commands():
        return [{"name": name} for name in registry.names()]

    registry.register("qmp_capabilities", _qmp_capabilities, {"*enable": "list"},
                      allow_before_negotiation=True)
    registry.register("query-version", query_version)
    registry.register("query-commands", query_commands)
