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

try:
    from helpers import Control          # the tests' QMP session class, where it lives now
except ImportError:
    from qmp_helpers import Control      # ... and where it lived before

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


class Model:
    """What the disk must hold: exact bytes, and ranges a kill -9 may have left either way
    (written after the client's last flush), as test_durable's."""

    def __init__(self, data):
        self.data = bytearray(data)
        self.uncertain = []

    def check_and_adopt(self, actual):
        """Every certain byte is as written; then the disk as read is the model."""
        mask = bytearray(len(self.data))
        for off, n in self.uncertain:
            mask[off:off + n] = b"\x01" * n
        pos = 0
        while pos < len(mask):
            start = mask.find(b"\x00", pos)
            if start < 0:
                break
            end = mask.find(b"\x01", start)
            end = len(mask) if end < 0 else end
            assert actual[start:end] == self.data[start:end], \
                "flushed data lost in [%d, %d)" % (start, end)
            pos = end
        self.data = bytearray(actual)
        self.uncertain = []


class Writer(threading.Thread):
    """A client writing random 4K-64K pieces, a flush after every eight, until finish().

    model: a Model kept exact with the flushed writes; a kill -9 of the server ends the
    writer, and finish(flush=False) hands what it may have lost to the model."""

    def __init__(self, uri, size, seed, model=None, pace=0.002):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size, self.model, self.pace = size, model, pace
        self.rnd = random.Random(seed)
        self.done = threading.Event()
        self.pending = []            # written (or being written) since the last good flush
        self.writes = 0
        self.error = None

    def run(self):
        try:
            while not self.done.is_set():
                length = self.rnd.randrange(4096, 65537) // 512 * 512
                offset = self.rnd.randrange(0, (self.size - length) // 512) * 512
                data = self.rnd.randbytes(length)
                self.pending.append((offset, data))
                self.h.pwrite(data, offset)
                self.writes += 1
                if self.writes % 8 == 0:
                    self.h.flush()
                    self._settle()
                self.done.wait(self.pace)
        except nbd.Error as e:
            self.error = e           # a server killed under it, or a real failure

    def _settle(self):
        if self.model is not None:
            for off, data in self.pending:
                self.model.data[off:off + len(data)] = data
        self.pending = []

    def finish(self, flush=True):
        """Stop; with flush (the server is alive), every write is certain; returns the count."""
        self.done.set()
        self.join()
        if flush:
            if self.error is not None:
                raise self.error
            self.h.flush()
            self._settle()
        elif self.model is not None:
            self.model.uncertain += [(off, len(data)) for off, data in self.pending]
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        return self.writes
