"""jobctl bitmap: the disk's dirty bitmaps (changed-block tracking).

    jobctl bitmap add NAME [--granularity 64K] [--persistent] [--disabled]
    jobctl bitmap remove|clear|enable|disable NAME
    jobctl bitmap merge TARGET SOURCE...
    jobctl bitmap list [--json]
    jobctl bitmap show NAME [--offset N] [--length N] [--json]

Each is one QMP command (block-dirty-bitmap-*, query-block,
x-block-dirty-bitmap-extents); --device picks the disk (default: the one the
server serves).  `show` prints the bitmap as `nbdinfo --map` prints the
qemu:dirty-bitmap context (nbdkit cannot offer that context, so this is the
way to it): clean and dirty ranges covering the range asked, and with --json
the same list nbdinfo --map --json prints.
"""

import json

from .units import format_size, parse_size

DIRTY, CLEAN = (1, "dirty"), (0, "clean")


def register(add_command):
    """jobctl/commands/ registration: `add_command.common` is the shared options' parser."""
    add_parser(add_command, add_command.common)


def add_parser(command, common):
    """The `bitmap` command: command(name, help) makes a subcommand parser;
    common holds the options every (sub)command takes (--socket, --overlay)."""
    p = command("bitmap", "dirty bitmaps of the disk: add, remove, clear, enable, disable, "
                          "merge, list, show")
    actions = p.add_subparsers(dest="bitmap_action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    def action(name, help_text):
        sub = actions.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.add_argument("--device", help="the disk's device name (default: the served disk)")
        return sub

    a = action("add", "add a bitmap that records every change of the disk from now on")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--granularity", type=_size, help="bytes per bit, a power of 2 from 512 "
                                                     "to 64M (default: the cluster size)")
    a.add_argument("--persistent", action="store_true",
                   help="keep it in the state directory: it survives restarts and crashes")
    a.add_argument("--disabled", action="store_true", help="do not record until enabled")
    for verb, text in (("remove", "remove a bitmap"),
                       ("clear", "clear a bitmap: it records from now on"),
                       ("enable", "start recording changes"),
                       ("disable", "stop recording changes (the contents stay)")):
        action(verb, text).add_argument("name", metavar="NAME")
    m = action("merge", "add the SOURCE bitmaps' dirty ranges to TARGET")
    m.add_argument("target", metavar="TARGET")
    m.add_argument("sources", metavar="SOURCE", nargs="+")
    ls = action("list", "list the bitmaps as a table")
    ls.add_argument("--json", action="store_true", help='print {"bitmaps": [...]}: QEMU\'s '
                                                        "BlockDirtyInfo")
    s = action("show", "print a bitmap's clean and dirty ranges (as nbdinfo --map)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--offset", type=_size, default=0, help="from this byte (default 0)")
    s.add_argument("--length", type=_size, help="this many bytes (default: to the end)")
    s.add_argument("--json", action="store_true",
                   help="a JSON list of {offset, length, type, description}, as "
                        "nbdinfo --map --json")
    p.set_defaults(func=run)


def _size(text):
    import argparse
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device(client, args):
    if args.device:
        return args.device
    return client.execute("query-block")[0]["device"]


def run(client, args):
    """Run one bitmap action; returns the exit code (errors raise, as elsewhere)."""
    node = _device(client, args)
    action = args.bitmap_action
    if action == "add":
        arguments = {"node": node, "name": args.name}
        if args.granularity is not None:
            arguments["granularity"] = args.granularity
        if args.persistent:
            arguments["persistent"] = True
        if args.disabled:
            arguments["disabled"] = True
        client.execute("block-dirty-bitmap-add", arguments)
    elif action in ("remove", "clear", "enable", "disable"):
        client.execute("block-dirty-bitmap-" + action, {"node": node, "name": args.name})
    elif action == "merge":
        client.execute("block-dirty-bitmap-merge",
                       {"node": node, "target": args.target, "bitmaps": args.sources})
    elif action == "list":
        bitmaps = _bitmaps(client, node)
        if args.json:
            print(json.dumps({"bitmaps": bitmaps}, indent=2))
        else:
            print(render_list(bitmaps))
    else:
        show(client, node, args)
    return 0


def _bitmaps(client, node):
    for disk in client.execute("query-block"):
        if disk["device"] == node:
            return disk.get("dirty-bitmaps", [])
    return []


def render_list(bitmaps):
    """NAME COUNT GRANULARITY RECORDING PERSISTENT BUSY, one row per bitmap."""
    rows = [("NAME", "DIRTY", "GRANULARITY", "RECORDING", "PERSISTENT", "BUSY")]
    for b in bitmaps:
        rows.append((b["name"], format_size(b["count"]), format_size(b["granularity"]),
                     _yes(b["recording"]), _yes(b["persistent"]), _yes(b["busy"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _yes(flag):
    return "yes" if flag else "no"


def dirty_ranges(client, node, name, offset, length):
    """Every dirty (offset, length) in [offset, offset+length), following `next`."""
    out = []
    stop = offset + length
    while offset < stop:
        reply = client.execute("x-block-dirty-bitmap-extents",
                               {"node": node, "name": name, "offset": offset,
                                "length": stop - offset})
        out += [(e["offset"], e["length"]) for e in reply["extents"]]
        if "next" not in reply:
            break
        offset = reply["next"]
    return out


def map_entries(dirty, offset, length):
    """Clean and dirty ranges that cover [offset, offset+length), as nbdinfo --map."""
    out, pos = [], offset
    for start, n in dirty:
        if start > pos:
            out.append((pos, start - pos) + CLEAN)
        out.append((start, n) + DIRTY)
        pos = start + n
    if pos < offset + length:
        out.append((pos, offset + length - pos) + CLEAN)
    return out


def show(client, node, args):
    # An empty query first: an unknown disk or bitmap is the server's error text.
    client.execute("x-block-dirty-bitmap-extents", {"node": node, "name": args.name,
                                                    "length": 0})
    size = next(d["size"] for d in client.execute("query-block") if d["device"] == node)
    offset = min(args.offset, size)
    length = size - offset if args.length is None else min(args.length, size - offset)
    entries = map_entries(dirty_ranges(client, node, args.name, offset, length), offset, length)
    if args.json:
        print(map_json(entries))
    else:
        for start, n, kind, text in entries:
            print("%10d  %10d  %3d  %s" % (start, n, kind, text))


def map_json(entries):
    """The text nbdinfo --map --json prints for these entries."""
    lines = ['{ "offset": %d, "length": %d, "type": %d, "description": "%s"}' % e
             for e in entries]
    return "[\n" + ",\n".join(lines) + "\n]"
