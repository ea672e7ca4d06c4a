"""Boot the tiny test guest against an NBD disk and check on the host what it wrote.

The guest (scripts/guest: Debian's cloud kernel + a busybox initramfs) runs under
qemu-system-x86_64 with TCG, attaches the NBD export as a virtio-blk disk, does what the
kernel command line asks (write blocks, read ranges, verify blocks), reports `GUEST-*` lines
on the serial console and powers off. QEMU's exit code says nothing about success: the
verdict is the `GUEST-RESULT` line in the serial log.

Block contents and offsets are a pure function of (seed, seq, block size, disk size), the
same in scripts/guest/init and here, so the host can recompute every byte the guest says it
wrote and compare it with any disk: an NBD URI, a raw file or any image qemu-img reads.

    result = run_guest(sock, {"mode": "writeread", "seed": 7, "count": 16})
    result.raise_if_failed()
    assert check_writes(result, "nbd+unix:///?socket=" + sock) == []
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

log = logging.getLogger("guest")

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "guest" / "build"
# scripts/guest/build exits with this when the kernel package cannot be downloaded.
EXIT_UNAVAILABLE = 3
SECTOR = 512
DEFAULT_TIMEOUT = 120.0
KERNEL_APPEND = "console=ttyS0 panic=-1 loglevel=4"


class GuestUnavailable(Exception):
    """The guest cannot be built on this machine (no kernel package): tests should skip."""


class GuestBuildError(Exception):
    """scripts/guest/build failed for another reason: a real error."""


class GuestFailed(AssertionError):
    """The guest did not report `GUEST-RESULT ok` (or its report is inconsistent)."""


# --- building ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kver: str


@functools.lru_cache(maxsize=None)
def build_guest(guest_dir: str | None = None) -> GuestImage:
    """Run scripts/guest/build (cached on disk and per process) and return the image paths.

    Raises GuestUnavailable when the kernel package cannot be downloaded, GuestBuildError on
    any other failure.
    """
    env = dict(os.environ)
    if guest_dir is not None:
        env["GUEST_DIR"] = str(guest_dir)
    proc = subprocess.run([str(BUILD_SCRIPT)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode == EXIT_UNAVAILABLE:
        lines = proc.stderr.strip().splitlines()
        raise GuestUnavailable("guest kernel package cannot be downloaded: %s"
                               % (lines[-1] if lines else "no details"))
    if proc.returncode != 0:
        raise GuestBuildError("scripts/guest/build exited %d:\n%s" % (proc.returncode, proc.stderr))
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    image = GuestImage(Path(values["KERNEL"]), Path(values["INITRD"]), values["KVER"])
    log.info("Guest image kernel=%s initrd=%s kver=%s", image.kernel, image.initrd, image.kver)
    return image


# --- the data contract (mirror of scripts/guest/init) --------------------------------------

def block_key(seed: str | int, seq: int) -> str:
    return hashlib.sha256(("overlay-guest seed=%s seq=%d" % (seed, seq)).encode()).hexdigest()


def expected_block(seed: str | int, seq: int, length: int) -> bytes:
    """The bytes the guest writes for block number seq: 64-byte text lines."""
    if length % 64:
        raise ValueError("block length must be a multiple of 64: %d" % length)
    key = block_key(seed, seq)[:40]
    return b"".join(b"%s %011d %010d\n" % (key.encode(), seq, j) for j in range(length // 64))


def expected_offset(seed: str | int, seq: int, disk_bytes: int, bs: int) -> int:
    """Where the guest writes block number seq: a seeded permutation of the disk's slots."""
    nslots = disk_bytes // bs
    h = hashlib.sha256(("overlay-guest seed=%s slots=%d" % (seed, nslots)).encode()).hexdigest()
    a = int(h[0:8], 16) % nslots
    b = int(h[8:16], 16) % nslots
    while math.gcd(a, nslots) != 1:
        a = (a + 1) % nslots
    return ((a * seq + b) % nslots) * bs


# --- the guest's report ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GuestWrite:
    seq: int
    offset: int
    length: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class GuestRead:
    offset: int
    length: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class GuestVerify:
    seq: int
    offset: int
    length: int
    ok: bool


@dataclasses.dataclass
class GuestReport:
    """What the serial log says, parsed."""
    start: dict[str, str] | None = None
    writes: list[GuestWrite] = dataclasses.field(default_factory=list)
    reads: list[GuestRead] = dataclasses.field(default_factory=list)
    verifies: list[GuestVerify] = dataclasses.field(default_factory=list)
    outcome: str | None = None        # "ok", "fail" or None (no GUEST-RESULT line yet)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    reason: str | None = None


# Anchored on the tag, not the line start: the serial log carries terminal escapes and an
# occasional kernel message in front.
_LINE = re.compile(r"GUEST-(START|WRITE|READ|VERIFY|RESULT)\b(.*)$")
_KV = re.compile(r"([a-z0-9_]+)=(\S*)")


def parse_log(text: str) -> GuestReport:
    report = GuestReport()
    for raw in text.splitlines():
        m = _LINE.search(raw.rstrip("\r"))
        if not m:
            continue
        tag, rest = m.group(1), m.group(2).strip()
        kv = dict(_KV.findall(rest))
        try:
            if tag == "START":
                report.start = kv
            elif tag == "WRITE":
                report.writes.append(GuestWrite(int(kv["seq"]), int(kv["offset"]),
                                                int(kv["length"]), kv["sha256"]))
            elif tag == "READ":
                report.reads.append(GuestRead(int(kv["offset"]), int(kv["length"]), kv["sha256"]))
            elif tag == "VERIFY":
                report.verifies.append(GuestVerify(int(kv["seq"]), int(kv["offset"]),
                                                   int(kv["length"]), kv["status"] == "ok"))
            elif tag == "RESULT" and report.outcome is None:
                outcome, _, tail = rest.partition(" ")
                report.outcome = outcome
                if outcome == "fail":
                    report.reason = tail.partition("reason=")[2] or tail
                else:
                    report.fields = dict(_KV.findall(tail))
        except (KeyError, ValueError):
            log.warning("Garbled guest line line=%r", raw)
    return report


@dataclasses.dataclass
class GuestResult:
    """The outcome of one guest run.

    status: "ok", "fail" (the guest said so), "timeout" (killed by us), or "no-result" (QEMU
    exited without a GUEST-RESULT line: it could not start, or the guest crashed).
    """
    status: str
    args: dict[str, str]
    report: GuestReport
    returncode: int | None
    elapsed: float
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seed(self) -> str:
        return (self.report.start or {}).get("seed", self.args.get("gseed", "1"))

    @property
    def disk_bytes(self) -> int | None:
        value = (self.report.start or {}).get("disk_bytes")
        return int(value) if value is not None else None

    @property
    def writes(self) -> list[GuestWrite]:
        return self.report.writes

    @property
    def reads(self) -> list[GuestRead]:
        return self.report.reads

    @property
    def verifies(self) -> list[GuestVerify]:
        return self.report.verifies

    @property
    def reason(self) -> str | None:
        return self.report.reason

    @property
    def sha256(self) -> str | None:
        """writeread: sha256 of all written blocks, in write order."""
        return self.report.fields.get("sha256")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def raise_if_failed(self) -> "GuestResult":
        """Raise GuestFailed (with the log's tail) unless the guest reported ok and its
        report is complete (as many GUEST-WRITE lines as it says it wrote)."""
        problem = None
        if self.status != "ok":
            problem = "status=%s reason=%s" % (self.status, self.reason)
        elif "writes" in self.report.fields and int(self.report.fields["writes"]) != len(self.writes):
            problem = "guest reported writes=%s but the log holds %d GUEST-WRITE lines" % (
                self.report.fields["writes"], len(self.writes))
        if problem:
            tail = "\n".join(self.log_text().splitlines()[-40:])
            raise GuestFailed("guest run failed: %s (log %s)\n%s" % (problem, self.log_path, tail))
        return self


# --- running -----------------------------------------------------------------------------

GUEST_ARGS = ("mode", "seed", "count", "bs", "start", "seconds", "ranges")


def guest_args(mode_args: Mapping[str, object] | str) -> dict[str, str]:
    """Normalise {"mode": "writeread", "seed": 7} or "gmode=writeread gseed=7" to
    {"gmode": "writeread", "gseed": "7"}; ranges may be given as [(offset, length), ...]."""
    if isinstance(mode_args, str):
        pairs = [word.split("=", 1) for word in mode_args.split()]
    else:
        pairs = list(mode_args.items())
    args = {}
    for key, value in pairs:
        name = key[1:] if key.startswith("g") and key[1:] in GUEST_ARGS else key
        if name not in GUEST_ARGS:
            raise ValueError("unknown guest argument %r (known: %s)" % (key, ", ".join(GUEST_ARGS)))
        if isinstance(value, (list, tuple)):
            value = ",".join("%d:%d" % (off, length) for off, length in value)
        value = str(value)
        if not re.fullmatch(r"[A-Za-z0-9_.:,-]+", value):
            raise ValueError("guest argument %s=%r has characters the guest refuses" % (key, value))
        args["g" + name] = value
    if "gmode" not in args:
        raise ValueError("guest arguments need a mode: %r" % (mode_args,))
    return args


class Guest:
    """One QEMU process running the test guest. start() returns at once; wait() collects.

    Use as a context manager so the QEMU process is killed (by its pid) if the test fails
    before waiting. blockdev_options are merged into QEMU's nbd -blockdev, e.g.
    {"reconnect-delay": 10} to ride out a server restart.
    """

    def __init__(self, nbd_socket: str | os.PathLike, mode_args: Mapping[str, object] | str, *,
                 timeout: float = DEFAULT_TIMEOUT, log_path: str | os.PathLike | None = None,
                 export: str | None = None, image: GuestImage | None = None,
                 memory_mib: int = 256, blockdev_options: Mapping[str, object] | None = None,
                 qemu_args: Sequence[str] = ()):
        self.args = guest_args(mode_args)
        self.nbd_socket = str(nbd_socket)
        self.timeout = timeout
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="guest-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.export = export
        self.image = image
        self.memory_mib = memory_mib
        self.blockdev_options = dict(blockdev_options or {})
        self.qemu_args = list(qemu_args)
        self.proc: subprocess.Popen | None = None
        self._started_at = 0.0
        self._result: GuestResult | None = None

    def command(self, image: GuestImage) -> list[str]:
        blockdev = {"driver": "nbd", "node-name": "disk0",
                    "server": {"type": "unix", "path": self.nbd_socket}}
        if self.export is not None:
            blockdev["export"] = self.export
        blockdev.update(self.blockdev_options)
        append = " ".join([KERNEL_APPEND] + ["%s=%s" % kv for kv in self.args.items()])
        return ["qemu-system-x86_64", "-accel", "tcg", "-m", str(self.memory_mib),
                "-nographic", "-monitor", "none", "-nic", "none", "-no-reboot",
                "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
                # JSON form: no escaping of commas in the socket path.
                "-blockdev", json.dumps(blockdev),
                "-device", "virtio-blk-pci,drive=disk0", *self.qemu_args]

    def start(self) -> "Guest":
        image = self.image or build_guest()
        argv = self.command(image)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._started_at = time.monotonic()
        log.info("Guest started pid=%d args=%s log=%s", self.proc.pid,
                 " ".join("%s=%s" % kv for kv in self.args.items()), self.log_path)
        log.debug("Guest command argv=%s", shlex.join(argv))
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def report(self) -> GuestReport:
        """What the guest has reported so far (the log is read while the guest runs)."""
        return parse_log(self.log_path.read_text(errors="replace"))

    def wait_for_writes(self, count: int, timeout: float = 60.0) -> list[GuestWrite]:
        """Block until the guest has logged at least count completed writes; return them.

        Raises GuestFailed if the guest stops first or the timeout passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            report = self.report()
            if len(report.writes) >= count:
                return report.writes
            if not self.running() or report.outcome is not None:
                raise GuestFailed("guest ended after %d of %d writes (log %s)"
                                  % (len(report.writes), count, self.log_path))
            if time.monotonic() > deadline:
                raise GuestFailed("guest logged %d of %d writes in %.0f s (log %s)"
                                  % (len(report.writes), count, timeout, self.log_path))
            time.sleep(0.1)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off when done) and parse its log.

        Past the timeout (default: what is left of the run's timeout) the QEMU process is
        killed and the status is "timeout".
        """
        if self._result is not None:
            return self._result
        if self.proc is None:
            raise RuntimeError("guest not started")
        if timeout is None:
            timeout = max(0.0, self._started_at + self.timeout - time.monotonic())
        status = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("Guest timed out pid=%d timeout=%.0f log=%s", self.proc.pid, timeout,
                        self.log_path)
            self.kill()
            status = "timeout"
        report = self.report()
        if status is None:
            status = report.outcome or "no-result"
        self._result = GuestResult(status=status, args=dict(self.args), report=report,
                                   returncode=self.proc.returncode,
                                   elapsed=time.monotonic() - self._started_at,
                                   log_path=self.log_path)
        log.info("Guest finished pid=%d status=%s reason=%s writes=%d elapsed=%.1f",
                 self.proc.pid, status, report.reason, len(report.writes), self._result.elapsed)
        return self._result

    def kill(self) -> None:
        """SIGKILL our own QEMU process (by pid) if it still runs."""
        if self.running():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def __enter__(self) -> "Guest":
        return self if self.proc else self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def start_guest(nbd_socket: str | os.PathLike, mode_args: Mapping[str, object] | str,
                **kwargs) -> Guest:
    """Start a guest and return at once; call .wait() later (or use it in a with block)."""
    return Guest(nbd_socket, mode_args, **kwargs).start()


def run_guest(nbd_socket: str | os.PathLike, mode_args: Mapping[str, object] | str,
              timeout: float = DEFAULT_TIMEOUT, **kwargs) -> GuestResult:
    """Boot the guest on the NBD export at nbd_socket, wait for it, return its result."""
    with start_guest(nbd_socket, mode_args, timeout=timeout, **kwargs) as guest:
        return guest.wait()


# --- checking a disk against the report ------------------------------------------------------

class _Reader:
    """pread(offset, length) over an NBD URI, an open libnbd handle, or an image file."""

    def __init__(self, target):
        self._handle = None
        self._fd = None
        self._own = True
        if hasattr(target, "pread") and not isinstance(target, (str, os.PathLike)):
            self._handle, self._own = target, False
        elif isinstance(target, str) and "://" in target:
            import nbd
            self._handle = nbd.NBD()
            self._handle.connect_uri(target)
        else:
            path = os.fspath(target)
            fmt = _image_format(path)
            if fmt == "raw":
                self._fd = os.open(path, os.O_RDONLY)
            else:
                import nbd
                self._handle = nbd.NBD()
                self._handle.connect_systemd_socket_activation(
                    ["qemu-nbd", "--read-only", "--format", fmt, path])

    def pread(self, offset: int, length: int) -> bytes:
        if self._fd is not None:
            data = os.pread(self._fd, length, offset)
            return data + bytes(length - len(data))  # past the end of a short file: zeros
        return self._handle.pread(length, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        elif self._own and self._handle is not None:
            try:
                self._handle.shutdown()
            finally:
                # libnbd 1.14's Python handle has no close(): dropping it closes it.
                self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_format(path: str) -> str:
    out = subprocess.run(["qemu-img", "info", "--output=json", path], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["format"]


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One reported write (or read) that the disk or the data contract contradicts.

    problem: "disk" (the target holds other bytes), "report" (the guest's sha256 is not the
    one the contract gives), "offset" (the write is not where the seed puts it).
    """
    seq: int | None
    offset: int
    length: int
    problem: str
    detail: str = ""

    def __str__(self) -> str:
        return "seq=%s offset=%d length=%d problem=%s %s" % (
            self.seq, self.offset, self.length, self.problem, self.detail)


def _as_results(results) -> list[GuestResult]:
    return [results] if isinstance(results, GuestResult) else list(results)


def check_writes(results: GuestResult | Iterable[GuestResult], target) -> list[Mismatch]:
    """Compare every write the guest(s) reported with the bytes on target; [] means all good.

    target: an NBD URI, an open libnbd handle, or an image file (raw, or any format qemu-img
    knows). Give several results in the order they ran: where writes overlap, the latest one
    is what the disk must hold.
    """
    history = [(r.seed, r.disk_bytes, w) for r in _as_results(results) for w in r.writes]
    owner = {}  # sector -> index into history of the last write covering it
    for index, (_, _, w) in enumerate(history):
        for sector in range(w.offset // SECTOR, (w.offset + w.length) // SECTOR):
            owner[sector] = index
    mismatches = []
    with _Reader(target) as reader:
        for index, (seed, disk_bytes, w) in enumerate(history):
            expected = expected_block(seed, w.seq, w.length)
            if hashlib.sha256(expected).hexdigest() != w.sha256:
                mismatches.append(Mismatch(w.seq, w.offset, w.length, "report",
                                           "guest sha256=%s" % w.sha256))
            # A run's slot size is its gbs, which is every one of its writes' length.
            if disk_bytes and expected_offset(seed, w.seq, disk_bytes, w.length) != w.offset:
                mismatches.append(Mismatch(w.seq, w.offset, w.length, "offset"))
            live = [s for s in range(w.offset // SECTOR, (w.offset + w.length) // SECTOR)
                    if owner[s] == index]
            if not live:
                continue
            actual = reader.pread(w.offset, w.length)
            bad = [s for s in live
                   if _sector(actual, w.offset, s) != _sector(expected, w.offset, s)]
            if bad:
                mismatches.append(Mismatch(w.seq, w.offset, w.length, "disk",
                                           "bad_sectors=%d first_bad_offset=%d"
                                           % (len(bad), bad[0] * SECTOR)))
    for m in mismatches:
        log.warning("Guest write mismatch %s", m)
    return mismatches


def _sector(data: bytes, base: int, sector: int) -> bytes:
    start = sector * SECTOR - base
    return data[start:start + SECTOR]


def check_reads(result: GuestResult, target) -> list[Mismatch]:
    """Compare the sha256 of every range the guest read with the same range on target."""
    mismatches = []
    with _Reader(target) as reader:
        for r in result.reads:
            digest = hashlib.sha256(reader.pread(r.offset, r.length)).hexdigest()
            if digest != r.sha256:
                mismatches.append(Mismatch(None, r.offset, r.length, "disk",
                                           "host sha256=%s guest sha256=%s" % (digest, r.sha256)))
    return mismatches


def assert_writes_on_disk(results: GuestResult | Iterable[GuestResult], target) -> None:
    """check_writes, raising GuestFailed that lists the mismatches."""
    mismatches = check_writes(results, target)
    if mismatches:
        raise GuestFailed("%d reported write(s) not on the disk:\n%s" % (
            len(mismatches), "\n".join(str(m) for m in mismatches[:20])))
