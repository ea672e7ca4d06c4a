"""The restored mirror's comparison (plugin/jobs/verify.py) and the target readers
(plugin/backends/target.py): equal ranges stay uncopied, everything else is copied,
and a reader stuck on a stalled NBD server gives up when interrupted."""

import os
import threading

import pytest

from faults import PauseControl, wait_until
from plugin.backends.filetarget import FileReader
from plugin.backends.nbdtarget import NbdReader
from plugin.blockcopy.verify import Verifier

MiB = 1 << 20


class FileStore:
    """The disk side of a comparison: read(buf, offset) from a file."""

    def __init__(self, path):
        self.path = path

    def read(self, buf, offset):
        with open(self.path, "rb") as f:
            f.seek(offset)
            f.readinto(buf)


def _files(tmp_path, size=8 * MiB):
    data = os.urandom(size)
    disk, target = tmp_path / "disk.img", tmp_path / "target.img"
    disk.write_bytes(data)
    target.write_bytes(data)
    return disk, target


def _run(verifier):
    verifier.start()
    wait_until(lambda: verifier.done, timeout=30)
    return _merged(verifier.take_different())


def _merged(ranges):
    out = []
    for off, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def test_equal_ranges_are_not_copied_and_different_chunks_are(tmp_path):
    disk, target = _files(tmp_path)
    with open(target, "r+b") as f:
        f.seek(3 * MiB + 777)
        f.write(b"\xee" * 10)                      # the target lost a write here
    v = Verifier(FileStore(disk), FileReader(str(target)), [(0, 2 * MiB), (3 * MiB, 3 * MiB)],
                 MiB, "t")
    assert _run(v) == [(3 * MiB, MiB)]
    assert (v.equal_bytes, v.different_bytes, v.remaining()) == (4 * MiB, MiB, 0)


def test_a_read_error_copies_everything_not_yet_compared(tmp_path):
    disk, target = _files(tmp_path)
    os.truncate(target, 5 * MiB)                   # reads past 5 MiB fail (short)
    v = Verifier(FileStore(disk), FileReader(str(target)), [(0, 8 * MiB)], MiB, "t")
    assert _run(v) == [(5 * MiB, 3 * MiB)]
    assert v.equal_bytes == 5 * MiB


def test_stop_before_start_copies_everything(tmp_path):
    disk, target = _files(tmp_path)
    v = Verifier(FileStore(disk), FileReader(str(target)), [(MiB, 2 * MiB)], MiB, "t")
    v.stop()
    assert v.done and _merged(v.take_different()) == [(MiB, 2 * MiB)]


def test_an_nbd_reader_stuck_on_a_stalled_server_returns_when_interrupted(servers, tmp_path):
    disk, target = _files(tmp_path)
    pause = tmp_path / "pause.sock"
    srv = servers.nbdkit("file", str(target), "pause-control=%s" % pause, filters=["pause"])
    reader = NbdReader(srv.uri)
    assert reader.read(4096, MiB) == disk.read_bytes()[MiB:MiB + 4096]
    PauseControl(pause).pause()
    outcome = []

    def read():
        try:
            reader.read(4096, 0)
            outcome.append("read")
        except OSError as e:
            outcome.append(e)

    t = threading.Thread(target=read)
    t.start()
    t.join(0.5)
    assert t.is_alive()                            # held by the paused server
    reader.interrupt()
    t.join(10)
    assert not t.is_alive() and isinstance(outcome[0], OSError)
    reader.close()
    PauseControl(pause).resume()


def test_a_verifier_on_a_stalled_server_stops_within_its_timeout(servers, tmp_path):
    disk, target = _files(tmp_path)
    pause = tmp_path / "pause.sock"
    srv = servers.nbdkit("file", str(target), "pause-control=%s" % pause, filters=["pause"])
    PauseControl(pause).pause()
    v = Verifier(FileStore(disk), NbdReader(srv.uri), [(0, 4 * MiB)], MiB, "t")
    v.start()
    wait_until(lambda: v.stalled(0.2), timeout=10)
    v.stop(timeout=10)
    assert v.done and _merged(v.take_different()) == [(0, 4 * MiB)]
    PauseControl(pause).resume()
