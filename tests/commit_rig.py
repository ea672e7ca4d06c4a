"""A rig for the commit tests: a raw base (a file, or served by nbdkit or qemu-nbd), the
overlay server with its control socket, data in the overlay, and a client that writes.

Every server is started through the `servers` fixture (killed by pid after the test).
"""

import json
import pathlib
import random
import threading

import nbd

from conftest import Server, make_image
from qmp_helpers import Control

MiB = 1 << 20
CS = 64 * 1024


def qemu_nbd(servers, image, tmp_path, name="qnbd", readonly=False):
    """qemu-nbd serving raw `image` to several clients at once (-e 8: the overlay's base
    connections and the commit's own)."""
    sock = pathlib.Path(tmp_path) / ("%s.sock" % name)
    argv = ["qemu-nbd", "-k", str(sock), "-t", "-e", "8", "-f", "raw", "--cache=writeback"]
    if readonly:
        argv.append("-r")
    server = Server(argv + [str(image)], sock, pathlib.Path(tmp_path) / ("%s.log" % name))
    servers.started.append(server)
    return server.wait_ready()


class CommitRig:
    """base_kind: "file" (the overlay's base is the file), "nbdkit" (nbdkit's file plugin
    serves it, through base_filters/base_args) or "qemu-nbd"."""

    def __init__(self, servers, tmp_path, base_kind="file", size=16 * MiB, base_filters=(),
                 base_args=(), seed=5, **params):
        self.servers, self.tmp, self.size = servers, pathlib.Path(tmp_path), size
        self.base_path = make_image(self.tmp / "base.img", size,
                                    [(0, size // 2), (size // 2 + MiB, size // 2 - MiB)],
                                    seed=seed)
        self.base_server = None
        if base_kind == "nbdkit":
            self.base_server = servers.nbdkit("file", self.base_path, *base_args,
                                              filters=base_filters)
        elif base_kind == "qemu-nbd":
            self.base_server = qemu_nbd(servers, self.base_path, self.tmp)
        self.base = self.base_server.uri if self.base_server else self.base_path
        self.overlay_dir = self.tmp / "ov"
        self.ctl = self.tmp / "ctl.sock"
        self.disk = servers.overlay(self.overlay_dir, base=self.base, control=str(self.ctl),
                                    **params)
        self.qmp = Control(self.ctl)
        self.h = self._connect()

    def _connect(self):
        h = nbd.NBD()
        h.connect_uri(self.disk.uri)
        return h

    def fill_overlay(self, seed=1, writes=60):
        """Data, zeroes and trims in the overlay (partial clusters too), flushed."""
        rnd = random.Random(seed)
        for i in range(writes):
            length = rnd.choice([512, 4096, CS, 3 * CS + 4096, MiB])
            offset = rnd.randrange(0, self.size - length) // 512 * 512
            if i % 10 == 3:
                self.h.zero(length, offset)
            elif i % 10 == 7:
                self.h.trim(length, offset)
            else:
                self.h.pwrite(rnd.randbytes(length), offset)
        self.h.flush()

    def commit(self, **args):
        return self.qmp("block-commit", device="disk0", **args)

    def disk_bytes(self):
        return bytes(self.h.pread(self.size, 0))

    def base_bytes(self):
        return pathlib.Path(self.base_path).read_bytes()

    def allocation(self):
        return self.qmp("query-block")[0]["allocation"]

    def held(self):
        """Clusters the overlay holds (data or zero)."""
        a = self.allocation()
        return a["data-clusters"] + a["zero-clusters"]

    def meta(self):
        return json.loads((self.overlay_dir / "meta.json").read_text())

    def records(self):
        folder = self.overlay_dir / "jobs"
        if not folder.exists():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}

    def kill9(self):
        self.qmp.close()
        self.disk.kill9()

    def stop(self):
        self.qmp.close()
        self.h.shutdown()
        assert self.disk.stop() == 0

    def restart(self):
        self.disk = self.servers.restart(self.disk)
        self.qmp = Control(self.ctl)
        self.h = self._connect()
        return self.qmp


class Writer(threading.Thread):
    """A client writing random 4K-64K pieces (and a flush every few) until finish()."""

    def __init__(self, uri, size, seed):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = size
        self.rnd = random.Random(seed)
        self.done = threading.Event()
        self.writes = 0

    def run(self):
        while not self.done.is_set():
            length = self.rnd.randrange(4096, 65537) // 512 * 512
            offset = self.rnd.randrange(0, (self.size - length) // 512) * 512
            self.h.pwrite(self.rnd.randbytes(length), offset)
            self.writes += 1
            if self.writes % 8 == 0:
                self.h.flush()
            self.done.wait(0.002)

    def finish(self):
        self.done.set()
        self.join()
        self.h.flush()
        self.h.shutdown()
        return self.writes
