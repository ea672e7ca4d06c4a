"""Network fixtures for the cross-host tests: TCP and TLS servers, a network namespace.

- psk_file(): a TLS pre-shared key made with psktool (gnutls-bin).
- TcpServer: a process (nbdkit...) listening on ADDR:PORT, ready once the
  port accepts; killed by pid by the servers fixture like every other.
- Netns: a network namespace with a veth pair to it, made by the test and
  deleted afterwards; link_down()/link_up() cut and restore the link.
- Rig: base image, overlay server, a target served by any server, QMP.
"""

import os
import pathlib
import socket
import subprocess
import time

from conftest import Server, make_image
from helpers import Control

MiB = 1 << 20


def free_port(addr="127.0.0.1"):
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def psk_file(tmp_path, user="alice"):
    path = pathlib.Path(tmp_path) / "keys.psk"
    subprocess.run(["psktool", "-u", user, "-p", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return path


def x509_dirs(tmp_path):
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate
    (certtool, gnutls-bin): (server_dir, client_dir) laid out as nbdkit's
    --tls-certificates and libnbd's tls-certificates= expect them."""
    base = pathlib.Path(tmp_path) / "pki"
    server, client = base / "server", base / "client"
    for d in (server, client):
        d.mkdir(parents=True, exist_ok=True)

    def certtool(*args, template=None):
        argv = ["certtool", *map(str, args)]
        if template is not None:
            tpl = base / ("t%d.cfg" % len(list(base.glob("t*.cfg"))))
            tpl.write_text(template)
            argv += ["--template", str(tpl)]
        subprocess.run(argv, check=True, capture_output=True)

    ca_key, ca_cert = base / "ca-key.pem", server / "ca-cert.pem"
    certtool("--generate-privkey", "--outfile", ca_key)
    certtool("--generate-self-signed", "--load-privkey", ca_key, "--outfile", ca_cert,
             template="cn = overlay test CA\nca\ncert_signing_key\nexpiration_days = 2\n")
    (client / "ca-cert.pem").write_bytes(ca_cert.read_bytes())
    for d, name, extra in ((server, "server", "tls_www_server\nip_address = 127.0.0.1\n"
                                              "dns_name = localhost\n"),
                           (client, "client", "tls_www_client\n")):
        key = d / ("%s-key.pem" % name)
        certtool("--generate-privkey", "--outfile", key)
        certtool("--generate-certificate", "--load-privkey", key, "--load-ca-certificate",
                 ca_cert, "--load-ca-privkey", ca_key, "--outfile", d / ("%s-cert.pem" % name),
                 template="cn = %s\n%sencryption_key\nsigning_key\nexpiration_days = 2\n"
                 % ("127.0.0.1" if name == "server" else "overlay client", extra))
    return server, client


def _tcp_accepts(addr, port):
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except OSError:
        return False


class TcpServer(Server):
    """A server on addr:port; `uri` is nbd:// (or nbds:// with tls_query)."""

    def __init__(self, argv, addr, port, log_path, uri):
        self.addr, self.port = addr, port
        super().__init__(argv, pathlib.Path(log_path).with_suffix(".none"), log_path)
        self.uri = uri

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while not _tcp_accepts(self.addr, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" % (self.proc.returncode,
                                                                    self.log()))
            if time.monotonic() > deadline:
                raise RuntimeError("server did not listen on %s:%d:\n%s"
                                   % (self.addr, self.port, self.log()))
            time.sleep(0.02)
        return self


def nbdkit_tcp(servers, name, plugin_args, addr="127.0.0.1", port=None, psk=None,
               prefix=(), wait=True, user="alice", x509=None):
    """nbdkit serving plugin_args on addr:port, with --tls=require over psk if given,
    or over X.509 certificates if x509=(server_dir, client_dir) is given."""
    port = port or free_port(addr if not prefix else "127.0.0.1")
    argv = list(prefix) + ["nbdkit", "-f", "-i", addr, "-p", str(port)]
    if x509 is not None:
        argv += ["--tls=require", "--tls-certificates=%s" % x509[0]]
        uri = "nbds://%s:%d/?tls-certificates=%s" % (addr, port, x509[1])
    elif psk is not None:
        argv += ["--tls=require", "--tls-psk=%s" % psk]
        uri = "nbds://%s@%s:%d/?tls-psk-file=%s" % (user, addr, port, psk)
    else:
        uri = "nbd://%s:%d/" % (addr, port)
    argv += list(plugin_args)
    server = TcpServer(argv, addr, port, servers.tmp / ("%s-%d.log" % (name, port)), uri)
    servers.started.append(server)
    return server.wait_ready() if wait else server


def restart_tcp(servers, server):
    """The same command again on the same port (after the old one exited)."""
    again = TcpServer(server.argv, server.addr, server.port,
                      servers.tmp / ("restart-%d-%d.log" % (server.port, len(servers.started))),
                      server.uri)
    servers.started.append(again)
    return again.wait_ready()


class Netns:
    """A namespace reached over a veth pair: 10.77.N.1 here, 10.77.N.2 inside."""

    def __init__(self):
        n = os.getpid() % 200 + 20
        self.name = "ovnet%d" % os.getpid()
        self.outer, self.inner = "ovo%d" % os.getpid(), "ovi%d" % os.getpid()
        self.here, self.there = "10.77.%d.1" % n, "10.77.%d.2" % n
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            self._ip("link", "set", self.inner, "netns", self.name)
            self._ip("addr", "add", self.here + "/24", "dev", self.outer)
            self._ip("link", "set", self.outer, "up")
            self._ip("-n", self.name, "addr", "add", self.there + "/24", "dev", self.inner)
            self._ip("-n", self.name, "link", "set", self.inner, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
        except Exception:
            self.delete()
            raise

    @staticmethod
    def _ip(*args):
        subprocess.run(["ip", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    @property
    def exec_prefix(self):
        return ["ip", "netns", "exec", self.name]

    def link_down(self):
        self._ip("link", "set", self.outer, "down")

    def link_up(self):
        self._ip("link", "set", self.outer, "up")
        # Addresses stay, the route comes back with the link.

    def delete(self):
        subprocess.run(["ip", "link", "del", self.outer], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)


class Rig:
    """Base image with data, the overlay server and its QMP session, some target."""

    def __init__(self, servers, tmp_path, connect, size=16 * MiB, **params):
        self.tmp = pathlib.Path(tmp_path)
        self.size = size
        self.base = make_image(self.tmp / "base.img", size,
                               [(0, size // 2 - 65536), (size // 2 + 65536, size // 2 - 65536)],
                               seed=23)
        self.ctl_path = self.tmp / "ctl.sock"
        self.disk = servers.overlay(self.tmp / "ov", base=self.base,
                                    control=str(self.ctl_path), **params)
        self.target_path = self.tmp / "target.img"
        with open(self.target_path, "wb") as f:
            f.truncate(size)
        self.qmp = Control(self.ctl_path)
        self.h = connect(self.disk.uri)

    def mirror(self, target, **args):
        args.setdefault("sync", "full")
        return self.qmp("drive-mirror", device="disk0", target=target, **args)

    def disk_bytes(self):
        return bytes(self.h.pread(self.size, 0))

    def target_bytes(self):
        return self.target_path.read_bytes()

    def errors(self):
        return [e["data"] for e in self.qmp.events if e["event"] == "BLOCK_JOB_ERROR"]

    def wait_progress(self, job="disk0", at_least=1):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = self.qmp.job(job)
            if info and info["offset"] >= at_least:
                return info
            time.sleep(0.05)
        raise AssertionError("job %s made no progress" % job)
