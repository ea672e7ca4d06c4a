"""A one-node Ceph cluster for tests, demos and benchmarks: no systemd, one temp folder.

One monitor, one memstore OSD (data lives in the OSD's memory) and a manager
with no Python modules (optional: RBD I/O works without it, pool quotas and
`ceph df` need it), all on 127.0.0.1 on a free port range, authentication off.
Every daemon is started here and stopped by its pid; nothing else is touched.

    cluster = CephCluster(folder)
    cluster.start()                  # ~2-3 s to a usable cluster
    cluster.create_pool("rbd")
    cluster.create_image("rbd", "disk", 64 << 20)
    ... rbd://rbd/disk?conf=<cluster.conf> ...
    cluster.stop()

From a shell (the demo and the benchmarks):

    python -m tests.cephcluster start DIR [--pool P] [--memstore-bytes N] [--no-mgr]
    python -m tests.cephcluster stop DIR

(the module is not named ceph.py: tests/ is on sys.path in pytest and would
shadow Debian's own `ceph` Python package.)
"""

import argparse
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

DAEMONS = ("ceph-mon", "ceph-osd", "monmaptool", "ceph")
MGR_MODULES = "/usr/share/ceph/mgr"
PORTS = 24                    # mon + osd (4 messengers) + mgr, with room to spare


class CephUnavailable(Exception):
    """Ceph's daemons or tools are not installed."""


class CephError(RuntimeError):
    pass


def available():
    """None if Ceph can run here, else the reason it cannot."""
    import shutil
    missing = [p for p in DAEMONS + ("rbd",) if shutil.which(p) is None]
    if missing:
        return "Ceph is not installed (missing %s; scripts/setup installs it)" % ", ".join(missing)
    try:
        subprocess.run(["/usr/bin/python3", "-c", "import rados, rbd"], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return "python3-rados / python3-rbd are not installed (scripts/setup installs them)"
    return None


def _free_port_range(count):
    """A base port such that base .. base+count-1 are all free on 127.0.0.1 now."""
    import random
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise CephError("no free range of %d ports on 127.0.0.1" % count)


def _die_with_parent():
    """In the child, before exec: SIGKILL when the process that started us dies, so a
    test run that is killed never leaves a cluster behind (stop() kills by pid otherwise)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class CephCluster:
    """One mon, one memstore OSD and (mgr=True) one mgr, in folder.

    memstore_bytes is the OSD's capacity (its data is in memory: RSS grows
    with what is written).  extra_conf adds or overrides [global] options.
    """

    def __init__(self, folder, memstore_bytes=1 << 30, mgr=True, extra_conf=None,
                 die_with_parent=True):
        self.dir = pathlib.Path(folder).resolve()
        # Daemons die with the process that started them (a killed test run leaves
        # none behind); the command-line `start` turns that off, it exits at once.
        self.die_with_parent = die_with_parent
        self.memstore_bytes = memstore_bytes
        self.with_mgr = mgr
        self.extra_conf = extra_conf or {}
        self.conf = str(self.dir / "ceph.conf")
        self.procs = {}                     # name -> Popen
        self.fsid = None
        self.base_port = None

    # -- configuration ---------------------------------------------------------

    def _write_conf(self):
        d = self.dir
        self.base_port = _free_port_range(PORTS)
        mon_port = self.base_port
        glob = {
            "fsid": self.fsid,
            "mon host": "v1:127.0.0.1:%d" % mon_port,
            "mon initial members": "a",
            "public addr": "127.0.0.1",
            "ms bind msgr2": "false",
            "ms bind ipv6": "false",
            "ms bind port min": str(mon_port + 1),
            "ms bind port max": str(mon_port + PORTS - 1),
            "auth cluster required": "none",
            "auth service required": "none",
            "auth client required": "none",
            "auth allow insecure global id reclaim": "false",
            "run dir": str(d),
            "pid file": str(d / "$name.pid"),
            "admin socket": str(d / "$name.asok"),
            "log file": str(d / "$name.log"),
            "crash dir": str(d / "crash"),
            "keyring": str(d / "keyring"),
            "mon data": str(d / "mon.$id"),
            "osd data": str(d / "osd.$id"),
            "mgr data": str(d / "mgr.$id"),
            "osd objectstore": "memstore",
            "memstore device bytes": str(self.memstore_bytes),
            "osd pool default size": "1",
            "osd pool default min size": "1",
            "osd pool default pg num": "8",
            "osd pool default pgp num": "8",
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": "0",
            "mon allow pool size one": "true",
            "mon allow pool delete": "true",
            "mon warn on pool no redundancy": "false",
            "paxos propose interval": "0.05",
            "mon osd full ratio": "0.99",
            "mon osd backfillfull ratio": "0.98",
            "mon osd nearfull ratio": "0.97",
            "osd max object name len": "256",
            "osd max object namespace len": "64",
            "osd op num shards": "2",
            "osd op num threads per shard": "1",
            "mgr initial modules": "",
            "mgr module path": str(d / "mgr-modules"),
            # The OSD's own crush and class updates at start race its monitor
            # session ('wrong fsid' from fsid 0, seen under load): place it here.
            "osd crush update on start": "false",
            "osd class update on start": "false",
        }
        if self.with_mgr:
            # Pool usage (and so a quota) reaches the monitor through the mgr:
            # report it every second rather than every five.
            glob.update({"mgr stats period": "1", "mon mgr digest period": "1",
                         "mon tick interval": "1", "mgr tick period": "1"})
        glob.update(self.extra_conf)
        lines = ["[global]"] + ["%s = %s" % kv for kv in glob.items()]
        # Each client process gets its own admin socket and log: the ceph tool,
        # rbd, qemu-nbd and nbdkit's librbd would otherwise fight over one.
        lines += ["", "[client]",
                  "admin socket = %s" % (d / "$name.$pid.asok"),
                  "log file = %s" % (d / "$name.$pid.log")]
        pathlib.Path(self.conf).write_text("\n".join(lines) + "\n")

    # -- running commands ------------------------------------------------------

    def _run(self, *argv, timeout=60, check=True):
        argv = [str(a) for a in argv]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CephError("%s timed out after %ss" % (" ".join(argv), timeout)) from None
        if check and p.returncode != 0:
            raise CephError("%s failed (%d): %s" % (" ".join(argv), p.returncode,
                                                    (p.stderr or p.stdout).strip()))
        return p

    def ceph(self, *args, timeout=60, check=True):
        """Run the ceph tool against this cluster; returns its stdout.

        A client that sends its first command before its monitor session has
        the cluster's fsid is refused with EPERM ("problem getting command
        descriptions"; the monitor logs "wrong fsid"); seen now and then while
        a mgr starts.  That one failure is retried.
        """
        for attempt in range(5):
            p = self._run("ceph", "-c", self.conf, "--connect-timeout", "20", *args,
                          timeout=timeout, check=False)
            if p.returncode == 0 or "problem getting command descriptions" not in p.stderr:
                break
        if check and p.returncode != 0:
            raise CephError("ceph %s failed (%d): %s" % (" ".join(args), p.returncode,
                                                         (p.stderr or p.stdout).strip()))
        return p.stdout

    def ceph_json(self, *args, timeout=60):
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout))

    def rbd(self, *args, timeout=120, check=True):
        return self._run("rbd", "-c", self.conf, *args, timeout=timeout, check=check).stdout

    def _daemon(self, name, argv):
        log = open(self.dir / ("%s.out" % name), "ab")
        try:
            p = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=_die_with_parent if self.die_with_parent else None)
        finally:
            log.close()
        self.procs[name] = p
        return p

    def _check_alive(self):
        for name, p in self.procs.items():
            if p.poll() is not None:
                out = (self.dir / ("%s.out" % name)).read_text(errors="replace")[-2000:]
                raise CephError("%s exited with %s:\n%s" % (name, p.returncode, out))

    def _wait(self, what, test, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if test():
                return
            if time.monotonic() > deadline:
                raise CephError("Ceph: timed out waiting for %s" % what)
            time.sleep(0.05)

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout=60):
        """Create and start the cluster; returns self once an OSD is up."""
        reason = available()
        if reason:
            raise CephUnavailable(reason)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsid = str(uuid.uuid4())
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout):
        t0 = time.monotonic()
        self._write_conf()
        conf = self.conf
        monmap = self.dir / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid,
                  "--addv", "a", "[v1:127.0.0.1:%d]" % self.base_port, monmap)
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap)
        self._daemon("mon.a", ["ceph-mon", "-c", conf, "-f", "-i", "a"])
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid, timeout=timeout).strip()
        self.ceph("osd", "crush", "add", "osd." + osd_id, "1.0", "root=default", "host=node",
                  timeout=timeout)
        (self.dir / ("osd." + osd_id)).mkdir(exist_ok=True)
        self._run("ceph-osd", "-c", conf, "--mkfs", "-i", osd_id, "--osd-uuid", osd_uuid)
        self.osd_name = "osd." + osd_id
        self._daemon(self.osd_name, ["ceph-osd", "-c", conf, "-f", "-i", osd_id])
        self._wait("the OSD to come up",
                   lambda: self.ceph_json("osd", "dump").get("osds", [{}])[0].get("up") == 1,
                   timeout)
        if self.with_mgr:
            # After the OSD: a starting mgr makes the races above likelier.
            (self.dir / "mgr.x").mkdir(exist_ok=True)
            self._mgr_modules()
            self._daemon("mgr.x", ["ceph-mgr", "-c", conf, "-f", "-i", "x"])
            self._wait("the mgr to become available",
                       lambda: self.ceph_json("mgr", "stat").get("available"), timeout)
        self.startup_seconds = time.monotonic() - t0

    def _mgr_modules(self):
        """A module folder with the mgr's Python helpers and no modules.

        Loading Debian's ~30 mgr modules takes ~13 s on two busy cores; pool
        statistics (what a quota needs) come from the mgr's C++ side.
        """
        folder = self.dir / "mgr-modules"
        folder.mkdir(exist_ok=True)
        for src in pathlib.Path(MGR_MODULES).glob("*.py"):
            dst = folder / src.name
            if not dst.exists():
                dst.symlink_to(src)

    def stop(self):
        """SIGKILL every daemon this cluster started (by pid) and reap it."""
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)   # a test may have stopped it
                    p.kill()
                except ProcessLookupError:
                    pass
            p.wait()
        self.procs.clear()

    def pids(self):
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def osd_pid(self):
        return self.procs[self.osd_name].pid

    def memory(self):
        """Resident set size of each running daemon, in bytes."""
        result = {}
        for name, pid in self.pids().items():
            try:
                for line in pathlib.Path("/proc/%d/status" % pid).read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        result[name] = int(line.split()[1]) * 1024
            except FileNotFoundError:
                pass
        return result

    # -- pools and images ------------------------------------------------------

    def create_pool(self, pool, pg_num=8):
        self.ceph("osd", "pool", "create", pool, str(pg_num), str(pg_num))
        self.ceph("osd", "pool", "application", "enable", pool, "rbd")
        return pool

    def delete_pool(self, pool):
        self.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")

    def set_pool_quota(self, pool, max_bytes=None, max_objects=None):
        """A quota (0 = none); a write past it fails with EDQUOT once the OSD notices."""
        if max_bytes is not None:
            self.ceph("osd", "pool", "set-quota", pool, "max_bytes", str(max_bytes))
        if max_objects is not None:
            self.ceph("osd", "pool", "set-quota", pool, "max_objects", str(max_objects))

    def pool_flags(self, pool):
        for p in self.ceph_json("osd", "pool", "ls", "detail"):
            if p["pool_name"] == pool:
                return p.get("flags_names", "").split(",")
        raise CephError("no pool %r" % pool)

    def wait_pool_full(self, pool, full=True, timeout=60):
        """Wait until the monitor has (full=False: has cleared) the pool's quota flag.

        The monitor learns the pool's usage from the mgr (run with mgr=True),
        so a quota takes effect seconds after the data is written.
        """
        self._wait("pool %s to become %s" % (pool, "full" if full else "not full"),
                   lambda: ("full_quota" in self.pool_flags(pool)) == full, timeout)

    def create_image(self, pool, image, size, object_size=None):
        args = ["create", "--size", "%dB" % size, "%s/%s" % (pool, image)]
        if object_size:
            args += ["--object-size", "%dB" % object_size]
        self.rbd(*args)
        return self.uri(pool, image)

    def remove_image(self, pool, image):
        self.rbd("rm", "--no-progress", "%s/%s" % (pool, image))

    def uri(self, pool, image):
        return "rbd://%s/%s?conf=%s" % (pool, image, self.conf)

    def export_image(self, pool, image, path=None):
        """The image's bytes (rbd export); written to path if given, else returned."""
        spec = "%s/%s" % (pool, image)
        if path is not None:
            self.rbd("export", "--no-progress", spec, str(path))
            return path
        out = subprocess.run(["rbd", "-c", self.conf, "export", "--no-progress", spec, "-"],
                             capture_output=True, timeout=300)
        if out.returncode != 0:
            raise CephError("rbd export %s failed: %s" % (spec, out.stderr.decode().strip()))
        return out.stdout

    def import_image(self, pool, image, path):
        self.rbd("import", "--no-progress", str(path), "%s/%s" % (pool, image))
        return self.uri(pool, image)

    def qemu_image_opts(self, pool, image):
        """The --image-opts string for qemu-nbd / qemu-img over this image."""
        return "driver=rbd,pool=%s,image=%s,conf=%s" % (pool, image, self.conf)


# -- command line --------------------------------------------------------------

def _main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.cephcluster",
                                 description="A one-node test Ceph cluster in a folder.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a cluster; prints the conf path, leaves it running")
    s.add_argument("dir")
    s.add_argument("--pool", action="append", default=[], help="create this pool (repeatable)")
    s.add_argument("--memstore-bytes", type=int, default=1 << 30)
    s.add_argument("--no-mgr", dest="mgr", action="store_false",
                   help="no ceph-mgr (RBD I/O works without; pool quotas and df do not)")
    t = sub.add_parser("stop", help="kill the daemons a 'start' left running in dir")
    t.add_argument("dir")
    args = ap.parse_args(argv)
    d = pathlib.Path(args.dir)
    pidfile = d / "daemons.json"
    if args.cmd == "start":
        c = CephCluster(d, memstore_bytes=args.memstore_bytes, mgr=args.mgr,
                        die_with_parent=False)
        try:
            c.start()
            for pool in args.pool:
                c.create_pool(pool)
        except (CephError, CephUnavailable) as e:
            print("cephcluster: %s" % e, file=sys.stderr)
            return 1
        pidfile.write_text(json.dumps(c.pids()))
        print(c.conf)
        print("started in %.1f s: %s" % (c.startup_seconds, c.pids()), file=sys.stderr)
        return 0
    try:
        pids = json.loads(pidfile.read_text())
    except FileNotFoundError:
        print("cephcluster: no cluster started in %s" % d, file=sys.stderr)
        return 1
    for name, pid in pids.items():
        try:
            # Only our own daemon: its command line names this folder's conf.
            cmdline = pathlib.Path("/proc/%d/cmdline" % pid).read_bytes()
            if str((d / "ceph.conf").resolve()).encode() not in cmdline:
                continue
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    pidfile.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
