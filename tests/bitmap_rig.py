"""Helpers for the dirty-bitmap tests: qemu-storage-daemon as the reference, answers, extents."""

import subprocess

from conftest import Server
from helpers import Control
from jobctl.qmp_client import QMPError

MiB = 1 << 20


def answer(control, command, **args):
    """("ok", return value) or ("error", class, desc): comparable across servers."""
    try:
        return ("ok", control(command, **args))
    except QMPError as e:
        return ("error", e.cls, e.desc)


def qsd(servers, tmp_path, size=64 * MiB, name="qsd"):
    """qemu-storage-daemon 7.2 with a qcow2 disk as node `disk0`, exported writable
    over NBD; returns (server, Control)."""
    image = tmp_path / (name + ".qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                   check=True)
    sock, control = tmp_path / (name + ".sock"), tmp_path / (name + "-qmp.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", "driver=file,filename=%s,node-name=%s-file,discard=unmap" % (image, name),
            "--blockdev", "driver=qcow2,file=%s-file,node-name=disk0,discard=unmap" % name,
            "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
            "--export", "type=nbd,id=exp,node-name=disk0,name=,writable=on",
            "--chardev", "socket,path=%s,server=on,wait=off,id=mon" % control,
            "--monitor", "chardev=mon"]
    server = Server(argv, sock, tmp_path / (name + ".log"), control=str(control))
    servers.started.append(server)
    server.wait_ready()
    return server, Control(control)


def qsd_bitmaps(control):
    """The BlockDirtyInfo list of QSD's node disk0."""
    for node in control("query-named-block-nodes", flat=True):
        if node["node-name"] == "disk0":
            return node.get("dirty-bitmaps", [])
    raise AssertionError("no node disk0")


def our_bitmaps(control):
    return control("query-block")[0]["dirty-bitmaps"]


def extents(control, name, node="disk0", page=None):
    """Every dirty range of a bitmap, following `next`."""
    out, offset = [], 0
    while True:
        args = {"node": node, "name": name, "offset": offset}
        if page:
            args["max_extents"] = page
        reply = control("x-block-dirty-bitmap-extents", **args)
        out += [(e["offset"], e["length"]) for e in reply["extents"]]
        if "next" not in reply:
            return out
        offset = reply["next"]


def covers(ranges, offset, length):
    """True if the sorted, disjoint ranges cover [offset, offset+length)."""
    pos, stop = offset, offset + length
    for start, n in ranges:
        if start > pos:
            break
        if start + n > pos:
            pos = start + n
        if pos >= stop:
            return True
    return pos >= stop


def granules(offset, length, granularity):
    """[offset, offset+length) widened to whole granules."""
    start = offset // granularity * granularity
    end = -(-(offset + length) // granularity) * granularity
    return start, end - start
