"""QMP commands for the disk's dirty bitmaps (QEMU's names, arguments and error texts).

    block-dirty-bitmap-add / -remove / -clear / -enable / -disable / -merge
    transaction                    (these as actions, plus abort; transaction.py)
    x-block-dirty-bitmap-extents   (extension: the dirty ranges, paged)

`node` is the disk's device name.  Every changing command runs as a
transaction of one action (quiesced, all or nothing, durable before the
reply: plugin/disk/bitmapchange.py).  query-block lists the bitmaps
(block_commands.py asks disk.bitmaps.info()).  Error texts are
qemu-storage-daemon 7.2's (docs/bitmaps.md lists them).
"""

from ..core.errors import CommandError
from .transaction import check_members, register_transaction

ADD = {"node": "str", "name": "str", "*granularity": "int", "*persistent": "bool",
       "*disabled": "bool"}
NAMED = {"node": "str", "name": "str"}
MERGE = {"node": "str", "target": "str", "bitmaps": "list"}
EXTENTS = {"node": "str", "name": "str", "*offset": "int", "*length": "int",
           "*max-extents": "int"}
DEFAULT_EXTENTS = 4096
MAX_EXTENTS = 16384


def check_merge_sources(data, prefix):
    """bitmaps: [name | {node, name}] (QEMU's BlockDirtyBitmapOrStr)."""
    for i, item in enumerate(data["bitmaps"]):
        where = "%sbitmaps[%d]" % (prefix, i)
        if isinstance(item, dict):
            check_members({"node": "str", "name": "str"}, item, where + ".")
        elif not isinstance(item, str):
            raise CommandError("Invalid parameter type for '%s', expected: "
                               "BlockDirtyBitmapOrStr" % where)


def register_bitmap_commands(registry, service):
    """Register the bitmap commands and `transaction`; returns the transaction's
    action table (drive-backup adds itself there)."""
    actions = register_transaction(registry, service)

    def device():
        return service.disk.device

    def node_of(node):
        """The other commands' node lookup ("Node 'x' not found")."""
        if node != device():
            raise CommandError("Node '%s' not found" % node)

    def add(ctx, data):
        if not data["name"]:
            raise CommandError("Bitmap name cannot be empty")
        if data["node"] != device():
            raise CommandError("Cannot find device='%s' nor node-name='%s'"
                               % (data["node"], data["node"]))
        ctx.bitmaps.add(data["name"], data.get("granularity"),
                        persistent=data.get("persistent", False),
                        disabled=data.get("disabled", False))

    def named(verb):
        def prepare(ctx, data):
            node_of(data["node"])
            getattr(ctx.bitmaps, verb)(data["name"])
        return prepare

    def merge(ctx, data):
        node_of(data["node"])
        sources = [(None, s) if isinstance(s, str) else (s["node"], s["name"])
                   for s in data["bitmaps"]]
        ctx.bitmaps.merge(data["target"], sources)

    kinds = [("block-dirty-bitmap-add", ADD, add, None)]
    for verb in ("remove", "clear", "enable", "disable"):
        kinds.append(("block-dirty-bitmap-" + verb, NAMED, named(verb), None))
    kinds.append(("block-dirty-bitmap-merge", MERGE, merge, check_merge_sources))
    for kind, schema, prepare, check in kinds:
        actions.add(kind, schema, prepare, check)
        registry.register(kind, lambda kind=kind, **args: actions.execute(kind, args), schema)

    def extents(**args):
        node_of(args["node"])
        disk = service.disk
        bitmap = disk.bitmaps.lookup(args["name"])
        offset = args.get("offset", 0)
        if not 0 <= offset <= disk.size:
            raise CommandError("Parameter 'offset' expects a value in range [0, %d]" % disk.size)
        length = args.get("length", disk.size - offset)
        if length < 0:
            raise CommandError("Parameter 'length' expects a non-negative value")
        limit = args.get("max-extents", DEFAULT_EXTENTS)
        if not 1 <= limit <= MAX_EXTENTS:
            raise CommandError("Parameter 'max-extents' expects a value in range [1, %d]"
                               % MAX_EXTENTS)
        runs, next_offset = bitmap.bits.runs(offset, length, limit)
        reply = {"extents": [{"offset": o, "length": n} for o, n in runs]}
        if next_offset is not None:
            reply["next"] = next_offset
        return reply

    registry.register("x-block-dirty-bitmap-extents", extents, EXTENTS)
    return actions
