"""On a full filesystem, metadata never needs new space (issue 9 §4): clusters.map is
written out in full when the state directory is made, so zeroing a range whose map
page was never written still flushes.

The state directory lives on a 4 MiB tmpfs mounted in a private mount namespace
(unshare -m) that only the nbdkit process sees; the test talks to it over NBD.
"""

import os
import subprocess

import nbd
import pytest

from conftest import PLUGIN, Server

MiB = 1 << 20
CHUNK = 64 * 1024


def _can_mount_tmpfs(tmp_path):
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs %s" % d],
                       capture_output=True)
    return r.returncode == 0


def test_zeroing_never_written_map_pages_on_a_full_filesystem_still_flushes(servers, tmp_path,
                                                                           connect):
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs root to mount a tmpfs in a private mount namespace")
    fs = tmp_path / "fs"
    fs.mkdir()
    sock, log, control = tmp_path / "full.sock", tmp_path / "full.log", tmp_path / "ctl.sock"
    script = ("mount -t tmpfs -o size=4m tmpfs {fs} && exec nbdkit -f -v -U {sock} python "
              "{plugin} overlay={fs}/ov size=64M cluster-size=4K control={control}").format(
                  fs=fs, sock=sock, plugin=PLUGIN, control=control)
    srv = Server(["unshare", "-m", "sh", "-c", script], sock, log, control=str(control))
    servers.started.append(srv)
    srv.wait_ready()
    h = connect(srv.uri)
    data = os.urandom(CHUNK)
    offset = 0
    with pytest.raises(nbd.Error) as full:
        while offset < 40 * MiB:           # the filesystem fills long before
            h.pwrite(data, offset)
            offset += CHUNK
    assert full.value.errno == "ENOSPC"
    written = offset
    assert written < 4 * MiB
    h.flush()                              # the map pages of what was written: allocated
    # Clusters 12288.. (48 MiB on) live in map pages no write ever touched.
    h.zero(16 * MiB, 48 * MiB)
    h.flush()
    h.zero(CHUNK, 0)                       # a written range back to zeros: metadata only
    h.flush()
    assert h.pread(CHUNK, 0) == bytes(CHUNK)
    assert h.pread(CHUNK, written - CHUNK) == data
    assert h.pread(4096, 50 * MiB) == bytes(4096)
    h.shutdown()
    assert srv.stop() == 0
