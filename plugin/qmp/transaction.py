"""QMP `transaction`: several actions, all or nothing, with no client write between them.

QEMU's model: the whole input is checked first (every action's type and data,
with QEMU 7.2's texts, e.g. "Parameter 'actions[0].data.name' is missing");
then, with the disk quiesced (no client request in progress, none admitted),
each action is prepared in order, seeing the ones before it; if any fails,
every prepared one is aborted; else all are committed.

Action kinds are registered in a TransactionActions table:

    actions.add("block-dirty-bitmap-add", schema, prepare)

prepare(ctx, data) applies the action; the dirty-bitmap actions use
ctx.bitmaps, one Change (plugin/disk/bitmapchange.py) shared by the
transaction and committed first.  An action with work of its own to finish or
undo (a job, such as drive-backup, later) returns an object with commit() and
abort(); commit() must not fail.  Single commands (block-dirty-bitmap-add...)
run as a transaction of one action, so they get the same checks and quiesce.
"""

import errno
import logging
import os

from ..core.errors import CommandError

log = logging.getLogger(__name__)

_TYPE_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "number": "number",
               "list": "array", "dict": "object"}
_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}


def check_members(schema, data, prefix):
    """Check an object against a schema ({"name": "str", "*opt": "int"}) as QEMU's
    input visitor does; prefix names it in errors ("actions[0].data.")."""
    if not isinstance(data, dict):
        raise CommandError("Invalid parameter type for '%s', expected: object" % prefix[:-1])
    known = set()
    for key, kind in schema.items():
        optional = key.startswith("*")
        key = key.lstrip("*")
        known.add(key)
        if key not in data:
            if not optional:
                raise CommandError("Parameter '%s%s' is missing" % (prefix, key))
            continue
        if not _CHECKS[kind](data[key]):
            raise CommandError("Invalid parameter type for '%s%s', expected: %s"
                               % (prefix, key, _TYPE_NAMES.get(kind, kind)))
    for key in data:
        if key not in known:
            raise CommandError("Parameter '%s%s' is unexpected" % (prefix, key))


class _Kind:
    __slots__ = ("schema", "prepare", "check", "grouped")

    def __init__(self, schema, prepare, check, grouped):
        self.schema, self.prepare, self.check, self.grouped = schema, prepare, check, grouped


class TransactionContext:
    """What a transaction's actions share: the service and one bitmap Change."""

    def __init__(self, service):
        self.service = service
        self._change = None

    @property
    def bitmaps(self):
        if self._change is None:
            self._change = self.service.disk.bitmaps.change()
        return self._change

    def commit_bitmaps(self):
        if self._change is not None:
            change, self._change = self._change, None
            change.commit()

    def abort_bitmaps(self):
        if self._change is not None:
            change, self._change = self._change, None
            change.abort()


def durable_error(e):
    """A bitmap change that could not be made durable, as a refusal with its errno."""
    err = e.errno or errno.EIO
    return CommandError("Dirty bitmaps not changed: %s (%s)"
                        % (os.strerror(err), errno.errorcode.get(err, err)))


class TransactionActions:
    """The action kinds `transaction` accepts."""

    def __init__(self, service):
        self.service = service
        self._kinds = {}
        self.add("abort", {}, _abort)

    def add(self, kind, schema, prepare, check=None, grouped=False):
        """check(data, prefix): more input checks (nested lists); grouped: the
        action supports completion-mode=grouped (jobs do; bitmap actions not)."""
        if kind in self._kinds:
            raise ValueError("transaction action %s is already registered" % kind)
        self._kinds[kind] = _Kind(schema, prepare, check, grouped)

    def check(self, actions, properties=None):
        """Every action's type and data; returns [(kind, data)]."""
        parsed = []
        for i, action in enumerate(actions):
            where = "actions[%d]" % i
            if not isinstance(action, dict):
                raise CommandError("Invalid parameter type for '%s', expected: object" % where)
            if "type" not in action:
                raise CommandError("Parameter '%s.type' is missing" % where)
            kind = action["type"]
            if not isinstance(kind, str):
                raise CommandError("Invalid parameter type for '%s.type', expected: string"
                                   % where)
            if kind not in self._kinds:
                raise CommandError("Parameter 'type' does not accept value '%s'" % kind)
            if "data" not in action:
                raise CommandError("Parameter '%s.data' is missing" % where)
            for key in action:
                if key not in ("type", "data"):
                    raise CommandError("Parameter '%s.%s' is unexpected" % (where, key))
            spec = self._kinds[kind]
            check_members(spec.schema, action["data"], where + ".data.")
            if spec.check is not None:
                spec.check(action["data"], where + ".data.")
            parsed.append((kind, action["data"]))
        mode = (properties or {}).get("completion-mode", "individual")
        if mode == "grouped":
            for kind, _ in parsed:
                if not self._kinds[kind].grouped:
                    raise CommandError("Action '%s' does not support Transaction property "
                                       "completion-mode = grouped" % kind)
        return parsed

    def run(self, parsed):
        """Prepare every action with clients quiesced, then commit all, or abort all."""
        disk = self.service.disk
        with disk.quiesce():
            ctx = TransactionContext(self.service)
            prepared = []
            try:
                try:
                    for kind, data in parsed:
                        action = self._kinds[kind].prepare(ctx, data)
                        if action is not None:
                            prepared.append(action)
                    ctx.commit_bitmaps()
                except OSError as e:
                    raise durable_error(e) from None
            except BaseException:
                ctx.abort_bitmaps()
                for action in reversed(prepared):
                    action.abort()
                raise
            for action in prepared:
                action.commit()

    def execute(self, kind, data):
        """One action as a command of its own (its arguments were checked by dispatch)."""
        spec = self._kinds[kind]
        if spec.check is not None:
            spec.check(data, "")
        self.run([(kind, data)])


def _abort(ctx, data):
    raise CommandError("Transaction aborted using Abort action")


def register_transaction(registry, service):
    """The `transaction` command; returns its TransactionActions (add action kinds)."""
    actions = TransactionActions(service)

    def transaction(actions_list, properties=None):
        if properties is not None:
            check_members({"*completion-mode": "str"}, properties, "properties.")
            if properties.get("completion-mode", "individual") not in ("individual",
                                                                       "grouped"):
                raise CommandError("Parameter 'properties.completion-mode' does not accept "
                                   "value '%s'" % properties["completion-mode"])
        actions.run(actions.check(actions_list, properties))

    registry.register("transaction",
                      lambda **args: transaction(args["actions"], args.get("properties")),
                      {"actions": "list", "*properties": "dict"})
    return actions
