"""The `jobctl metrics` command: print the exposition, write it for node_exporter, or serve it.

    jobctl metrics                      print once (Prometheus text format)
    jobctl metrics --output FILE        write FILE atomically (node_exporter's textfile collector)
    jobctl metrics --listen ADDR:PORT   serve GET /metrics over HTTP until interrupted

With --listen every scrape opens its own QMP session, so the endpoint outlives
restarts of nbdkit: a scrape while the server is down answers 200 with
`overlay_nbd_up 0`, as exporters do.  The HTTP server is the standard
library's, one request at a time (a scrape is four short queries; each QMP
session is bounded by --timeout).  Only the address given is bound.
"""

import argparse
import http.server
import os
import signal
import socket
import socketserver
import sys
import tempfile

from . import qmp_client
from .metrics import CONTENT_TYPE, collect, render_down

# Exit codes, as cli.py's (docs/jobctl.md).
EXIT_OK = 0
EXIT_FAILED = 1

SCRAPE_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0         # a client that sends nothing is dropped after this long


def add_command(command):
    """Add `metrics` to jobctl's parser; `command(name, help)` makes a subparser."""
    p = command("metrics", "print Prometheus metrics of the disk, its jobs and nbdkit "
                           "(or serve them over HTTP)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="ADDR:PORT", type=listen_address, action=_Listen,
                       help="serve GET /metrics on this address until interrupted "
                            "(e.g. 127.0.0.1:9732, [::1]:9732; port 0 picks a free one)")
    where.add_argument("--output", metavar="FILE",
                       help="write the metrics to FILE atomically (node_exporter's textfile "
                            "collector) instead of printing them")
    p.add_argument("--timeout", type=_positive_seconds, default=SCRAPE_TIMEOUT,
                   metavar="SECONDS",
                   help=f"with --listen: give up a scrape's QMP session after this long "
                        f"(default: {SCRAPE_TIMEOUT:g})")
    p.set_defaults(func=cmd_metrics)


register = add_command      # jobctl/commands/: every command module has register()


class _Listen(argparse.Action):
    """--listen: the command then runs on its own (cli.run calls args.standalone)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.listen = values
        namespace.standalone = serve


def listen_address(text):
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); the host may not be left out."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9732, [::1]:9732)")
    return host, int(port)


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}")
    return value


def cmd_metrics(client, args):
    """One scrape over jobctl's session: print it, or write it to --output."""
    text = collect(client, client.path)
    if args.output:
        write_atomically(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def write_atomically(path, text):
    """Write text to path through a temporary file in the same folder and a rename, so a
    reader (node_exporter) sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class Scraper:
    """One scrape per call, each over a new QMP session; says when the server comes and goes."""

    def __init__(self, control_path, timeout, log=None):
        self.control_path = control_path
        self.timeout = timeout
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._down = None            # why the last scrape failed, or None

    def scrape(self):
        try:
            with qmp_client.QMPClient(self.control_path, timeout=self.timeout) as client:
                text = collect(client, self.control_path)
        except (qmp_client.ConnectionProblem, qmp_client.Timeout, qmp_client.QMPError) as e:
            reason = getattr(e, "desc", None) or str(e)
            if reason != self._down:
                self.log(f"jobctl: metrics: control socket not answering: {reason}")
            self._down = reason
            return render_down(self.control_path)
        if self._down is not None:
            self.log(f"jobctl: metrics: control socket answering again: {self.control_path}")
        self._down = None
        return text


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = HTTP_TIMEOUT
    server_version = "jobctl-metrics"

    def do_GET(self):
        path = self.path.partition("?")[0]
        if path == "/metrics":
            self._send(200, self.server.scraper.scrape(), CONTENT_TYPE)
        elif path == "/":
            self._send(200, "overlay-nbd metrics: /metrics\n", "text/plain; charset=utf-8")
        else:
            self._send(404, "not found: use /metrics\n", "text/plain; charset=utf-8")

    def _send(self, code, text, content_type):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):     # noqa: A002 (http.server's name)
        pass                                  # a line per scrape would flood the journal


class _Server(http.server.HTTPServer):
    def __init__(self, address, family, scraper):
        self.address_family = family
        self.scraper = scraper
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer's own also looks the address up in DNS (getfqdn), which can
        # hang where DNS does not answer; the name is only used in CGI variables.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve(args, control_path):
    """--listen: serve until SIGINT or SIGTERM; returns the exit code."""
    host, port = args.listen
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server = _Server(address[:2], family, Scraper(control_path, args.timeout))
    except OSError as e:
        print(f"jobctl: error: metrics: cannot listen on {host}:{port}: {e.strerror or e}",
              file=sys.stderr, flush=True)
        return EXIT_FAILED
    bound = server.server_address
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    print(f"jobctl: metrics: serving http://{shown}:{bound[1]}/metrics "
          f"(control socket {control_path})", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass                           # the normal way to stop it, as `events --follow`
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
    return EXIT_OK


def _interrupt(signum, frame):
    raise KeyboardInterrupt
