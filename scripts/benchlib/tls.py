"""Section "tls": drive-mirror over TCP with TLS-PSK, against plain TCP and qemu-storage-daemon.

One random base of --size bytes.  Each run mirrors it (sync=full) to a fresh sparse raw
file served by `nbdkit file` on 127.0.0.1, until BLOCK_JOB_READY.  Two tables, one per
TLS cipher, because the cipher decides most of the time here (docs/benchmarks.md):

ready (AES-128-GCM: what scripts/nbdkit-overlay negotiates on a CPU with AES instructions,
scripts/tls-prefer-aes.conf):
- qemu-tls-aes (anchor): qemu-storage-daemon, qcow2 overlay on the base, `blockdev-mirror`
  to an nbd node with `tls-creds` (tls-creds-psk, priority=NORMAL:-CHACHA20-POLY1305) to
  nbdkit `--tls=require --tls-psk`;
- overlay-tls: our plugin, empty overlay on the base, `drive-mirror` to
  `nbds://alice@127.0.0.1:PORT/?tls-psk-file=KEYS`, GnuTLS policy as the launcher sets it
  (goal <= 1.0x the anchor);
- overlay-tcp: the same to the same kind of target without TLS (`nbd://`), for the cost of TLS.

chacha (CHACHA20-POLY1305: GnuTLS's NORMAL choice with a PSK, QEMU's default):
- qemu-tls (anchor): as above with QEMU's default priority;
- overlay-tls-chacha: ours with GnuTLS's default (plain `nbdkit python ...`; goal <= 1.0x).

Rows are interleaved and rotated per run, after one untimed warm-up round.
Both tables add the CPU time of the mirroring server (our nbdkit or
qemu-storage-daemon, TLS included) per GiB; the target's is not counted.
"""

import os
import subprocess


from benchlib.bench import REPO
from benchlib.mirror import ours_mirror_until_ready, qsd_mirror_until_ready
from benchlib.overlay import make_base, rotated
from benchlib.results import Goal
from benchlib.servers import free_port, wait_for_port

TITLE = "drive-mirror over TCP with TLS-PSK: overlay plugin vs qemu-storage-daemon"
SECTION = "tls"
TLS_GOAL = Goal(1.0)
USER = "alice"


NO_CHACHA = "NORMAL:-CHACHA20-POLY1305"
AES_POLICY = os.path.join(REPO, "scripts", "tls-prefer-aes.conf")


def run(bench):
    ready = bench.group(SECTION, "ready", "mirror of the random disk over TCP to 127.0.0.1 "
                        "until BLOCK_JOB_READY, TLS with AES-128-GCM", "s", bench.size)
    ready.row("qemu-tls-aes", "qemu-storage-daemon blockdev-mirror, tls-creds-psk "
              "priority=%s" % NO_CHACHA, anchor=True)
    ready.row("overlay-tls", "overlay plugin drive-mirror to nbds:// (TLS-PSK, "
              "scripts/nbdkit-overlay's GnuTLS policy)", goal=TLS_GOAL)
    ready.row("overlay-tcp", "overlay plugin drive-mirror to nbd:// (plain TCP)")
    chacha = bench.group(SECTION, "chacha", "the same with CHACHA20-POLY1305 (GnuTLS's "
                         "default with a PSK)", "s", bench.size)
    chacha.row("qemu-tls", "qemu-storage-daemon blockdev-mirror, tls-creds-psk (default "
               "priority)", anchor=True)
    chacha.row("overlay-tls-chacha", "overlay plugin drive-mirror to nbds:// (GnuTLS default)",
               goal=TLS_GOAL)
    base = make_base(bench)
    pskdir = bench.path("psk")
    os.makedirs(pskdir, exist_ok=True)
    keys = os.path.join(pskdir, "keys.psk")      # the name qemu's tls-creds-psk dir= expects
    subprocess.run(["psktool", "-u", USER, "-p", keys], check=True, capture_output=True)
    aes_env = dict(os.environ, GNUTLS_SYSTEM_PRIORITY_FILE=AES_POLICY)
    default_env = _default_env()
    runners = {"qemu-tls-aes": (ready, lambda: _qemu(bench, base, pskdir, keys, NO_CHACHA)),
               "overlay-tls": (ready, lambda: _ours(bench, base, keys, aes_env)),
               "overlay-tcp": (ready, lambda: _ours(bench, base, None, default_env)),
               "qemu-tls": (chacha, lambda: _qemu(bench, base, pskdir, keys, None)),
               "overlay-tls-chacha": (chacha, lambda: _ours(bench, base, keys, default_env))}
    for i in range(bench.runs + 1):
        bench.progress("tls: %s" % ("warm-up round" if i == 0 else
                                    "run %d/%d" % (i, bench.runs)))
        for key in rotated(list(runners), i):
            group, runner = runners[key]
            seconds, cpu = runner()
            if i > 0:
                group.add(key, seconds, cpu=cpu)


def _tcp_target(bench, keys):
    """A fresh sparse raw file served by nbdkit on 127.0.0.1 (TLS required if keys)."""
    path = bench.path("tls-target.img")
    with open(path, "wb") as f:
        f.truncate(bench.size)
    port = free_port()
    tls = ["--tls=require", "--tls-psk=" + keys] if keys else []
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *tls, "file", path]
    server = bench.servers.start("tls-target", lambda sock: argv, env=_default_env(),
                                 ready=False)
    wait_for_port(port, server)
    return path, port, server


def _ours(bench, base, keys, env):
    path, port, target = _tcp_target(bench, keys)
    uri = ("nbds://%s@127.0.0.1:%d/?tls-psk-file=%s" % (USER, port, keys) if keys
           else "nbd://127.0.0.1:%d/" % port)
    try:
        return ours_mirror_until_ready(bench, base, uri, "overlay-tls", env=env)
    finally:
        bench.servers.stop(target)
        os.unlink(path)


def _qemu(bench, base, pskdir, keys, priority):
    path, port, target = _tcp_target(bench, keys)
    creds = "tls-creds-psk,id=tls0,endpoint=client,dir=%s,username=%s" % (pskdir, USER)
    if priority:
        creds += ",priority=" + priority
    try:
        return qsd_mirror_until_ready(
            bench, base, "driver=raw,node-name=tgt,file.driver=nbd,file.server.type=inet,"
            "file.server.host=127.0.0.1,file.server.port=%d,file.tls-creds=tls0" % port,
            ["--object", creds], env=_default_env())
    finally:
        bench.servers.stop(target)
        os.unlink(path)


def _default_env():
    return {k: v for k, v in os.environ.items() if k != "GNUTLS_SYSTEM_PRIORITY_FILE"}
