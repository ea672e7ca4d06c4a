"""Section "tls": drive-mirror over TCP with TLS-PSK, against plain TCP and qemu-storage-daemon.

One random base of --size bytes.  Each run mirrors it (sync=full) to a fresh sparse raw
file served by `nbdkit file` on 127.0.0.1, until BLOCK_JOB_READY:

- qemu-tls (anchor): qemu-storage-daemon, qcow2 overlay on the base, `blockdev-mirror` to an
  nbd node with `tls-creds` (an object tls-creds-psk) to nbdkit `--tls=require --tls-psk`;
- overlay-tls: our plugin, empty overlay on the base, `drive-mirror` to
  `nbds://alice@127.0.0.1:PORT/?tls-psk-file=KEYS` (goal <= 1.0x the anchor);
- overlay-tcp: the same to the same kind of target without TLS (`nbd://`), for the cost of TLS.

Rows are interleaved and rotated per run, after one untimed warm-up round.
"""

import os
import socket
import subprocess
import time


from benchlib.mirror import ours_mirror_until_ready, qsd_mirror_until_ready
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal

TITLE = "drive-mirror over TCP with TLS-PSK: overlay plugin vs qemu-storage-daemon"
SECTION = "tls"
TLS_GOAL = Goal(1.0)
USER = "alice"


def run(bench):
    ready = bench.group(SECTION, "ready", "mirror of the random disk over TCP to 127.0.0.1 "
                        "until BLOCK_JOB_READY", "s", bench.size)
    ready.row("qemu-tls", "qemu-storage-daemon blockdev-mirror, nbd node with tls-creds-psk",
              anchor=True)
    ready.row("overlay-tls", "overlay plugin drive-mirror to nbds:// (TLS-PSK)", goal=TLS_GOAL)
    ready.row("overlay-tcp", "overlay plugin drive-mirror to nbd:// (plain TCP)")
    base = make_base(bench)
    pskdir = bench.path("psk")
    os.makedirs(pskdir, exist_ok=True)
    keys = os.path.join(pskdir, "keys.psk")      # the name qemu's tls-creds-psk dir= expects
    subprocess.run(["psktool", "-u", USER, "-p", keys], check=True, capture_output=True)
    runners = {"qemu-tls": lambda: _qemu(bench, base, pskdir, keys),
               "overlay-tls": lambda: _ours(bench, base, keys),
               "overlay-tcp": lambda: _ours(bench, base, None)}
    for i in range(bench.runs + 1):
        bench.progress("tls: %s" % ("warm-up round" if i == 0 else
                                    "run %d/%d" % (i, bench.runs)))
        for key in rotated(list(runners), i):
            seconds = runners[key]()
            if i > 0:
                ready.add(key, seconds)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_target(bench, keys):
    """A fresh sparse raw file served by nbdkit on 127.0.0.1 (TLS required if keys)."""
    path = bench.path("tls-target.img")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    port = _free_port()
    tls = ["--tls=require", "--tls-psk=" + keys] if keys else []
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *tls, "file", path]
    server = bench.servers.start("tls-target", lambda sock: argv, ready=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                raise RuntimeError("nbdkit did not listen on port %d%s"
                                   % (port, server.log_tail()))
            time.sleep(0.02)
    return path, port, server


def _ours(bench, base, keys):
    path, port, target = _tcp_target(bench, keys)
    uri = ("nbds://%s@127.0.0.1:%d/?tls-psk-file=%s" % (USER, port, keys) if keys
           else "nbd://127.0.0.1:%d/" % port)
    try:
        return ours_mirror_until_ready(bench, base, uri, "overlay-tls")
    finally:
        bench.servers.stop(target)
        os.unlink(path)


def _qemu(bench, base, pskdir, keys):
    path, port, target = _tcp_target(bench, keys)
    try:
        return qsd_mirror_until_ready(
            bench, base, "driver=raw,node-name=tgt,file.driver=nbd,file.server.type=inet,"
            "file.server.host=127.0.0.1,file.server.port=%d,file.tls-creds=tls0" % port,
            ["--object", "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=%s"
             % (pskdir, USER)])
    finally:
        bench.servers.stop(target)
        os.unlink(path)
