"""A damaged state directory is refused with one line and left byte-identical (issue 9 §1).

One good state directory is made by a real nbdkit (a base, some written, some
zeroed clusters, flushed), then each case copies it, damages the copy and starts
nbdkit on it: nbdkit must exit non-zero with ONE line that names the damaged
file, and every file of the state directory (and the base) must hash the same
afterwards.  Other tests: what a failed start leaves behind (nothing), device=
remembered, directories of an older server still served.
"""

import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import PLUGIN, make_image, sha256_file
from helpers import Control

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB
CS = 64 * KiB


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A good state directory over a base file, made and written by a real nbdkit."""
    import nbd
    from conftest import Servers
    root = tmp_path_factory.mktemp("golden")
    base = make_image(root / "base.img", SIZE, [(0, SIZE)], seed=3)
    servers = Servers(root)
    try:
        srv = servers.overlay(root / "ov", base=base)
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"\xab" * CS, 0)                 # cluster 0 DATA
        h.zero(2 * MiB, CS)                       # clusters 1-32 ZERO
        h.pwrite(b"\xcd" * 1000, 3 * MiB + 10)    # cluster 48 DATA (copy-on-write)
        h.pwrite(b"\xef" * CS, SIZE - CS)         # the last cluster DATA
        h.flush()
        h.shutdown()
        del h
        assert srv.stop() == 0
    finally:
        servers.cleanup()
    return root


def snapshot(*roots):
    """{path: sha256 | 'dir' | 'symlink'} of every file under roots (or the file itself)."""
    out = {}
    for root in roots:
        root = str(root)
        if not os.path.isdir(root):
            out[root] = sha256_file(root) if os.path.exists(root) else None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = "dir"
            for name in filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    out[p] = "special"
                else:
                    out[p] = (os.path.getsize(p), sha256_file(p))
    return out


def run_nbdkit(tmp_path, *params):
    argv = ["nbdkit", "-f", "-U", str(tmp_path / "x.sock"), "python", str(PLUGIN), *params]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def one_error_line(r):
    assert r.returncode != 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nbdkit: overlay: error: "), lines[0]
    return lines[0]


# -- the damage: each edits a copy (ov: the state dir, base: its base file) ----

def meta_edit(**changes):
    """Set (value) or remove (DELETE) keys of meta.json."""
    def edit(ov, base):
        p = ov / "meta.json"
        meta = json.loads(p.read_text())
        for k, v in changes.items():
            if v is DELETE:
                meta.pop(k)
            else:
                meta[k] = v
        p.write_text(json.dumps(meta))
    return edit


DELETE = object()


def write_file(name, content):
    def edit(ov, base):
        (ov / name).write_bytes(content)
    return edit


def truncate(name, length):
    def edit(ov, base):
        os.truncate(ov / name, length(os.path.getsize(ov / name)))
    return edit


def remove(name):
    def edit(ov, base):
        os.unlink(ov / name)
    return edit


def make_dir(name):
    def edit(ov, base):
        os.unlink(ov / name)
        os.mkdir(ov / name)
    return edit


def poke(name, offset, data):
    def edit(ov, base):
        with open(ov / name, "r+b") as f:
            f.seek(offset)
            f.write(data)
    return edit


def base_truncate(ov, base):
    os.truncate(base, SIZE // 2)


def base_other_content(ov, base):
    st = os.stat(base)
    with open(base, "r+b") as f:
        f.write(b"\x00" * 4096)
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))     # even with the same mtime


def base_removed(ov, base):
    os.unlink(base)


def control_regular_file(ov, base):
    (ov.parent / "ctl").write_text("not a socket\n")
    return ["control=%s" % (ov.parent / "ctl")]


def control_in_missing_dir(ov, base):
    return ["control=%s" % (ov.parent / "nowhere" / "ctl.sock")]


def base_given(ov, base):
    return ["base=%s" % base]


def also(*edits):
    def edit(ov, base):
        extra = []
        for e in edits:
            extra += e(ov, base) or []
        return extra
    return edit


# (id, damage, file the line must name, text the line must hold)
CASES = [
    ("meta-size-0", meta_edit(size=0), "meta.json", "'size'"),
    ("meta-size-halved", meta_edit(size=SIZE // 2), "clusters.map", "needs 64"),
    ("meta-size-doubled", meta_edit(size=SIZE * 2), "clusters.map", "needs 256"),
    ("meta-size-negative", meta_edit(size=-SIZE), "meta.json", "positive integer"),
    ("meta-size-string", meta_edit(size="8M"), "meta.json", "'size'"),
    ("meta-size-float", meta_edit(size=float(SIZE)), "meta.json", "'size'"),
    ("meta-size-bool", meta_edit(size=True), "meta.json", "'size'"),
    ("meta-cluster-size-0", meta_edit(cluster_size=0), "meta.json", "power of 2"),
    ("meta-cluster-size-3", meta_edit(cluster_size=3), "meta.json", "power of 2"),
    ("meta-cluster-size-4096", meta_edit(cluster_size=4096), "clusters.map", "needs 2048"),
    ("meta-cluster-size-128K", meta_edit(cluster_size=128 * KiB), "clusters.map", "needs 64"),
    ("meta-cluster-size-2^40", meta_edit(cluster_size=1 << 40), "meta.json", "power of 2"),
    ("meta-missing-size", meta_edit(size=DELETE), "meta.json", "'size' is missing"),
    ("meta-missing-cluster-size", meta_edit(cluster_size=DELETE), "meta.json",
     "'cluster_size' is missing"),
    ("meta-missing-base", meta_edit(base=DELETE), "meta.json", "'base' is missing"),
    ("meta-missing-active", meta_edit(active=DELETE), "meta.json", "'active' is missing"),
    ("meta-missing-format", meta_edit(format=DELETE), "meta.json", "not an overlay state file"),
    ("meta-missing-version", meta_edit(version=DELETE), "meta.json", "format version"),
    ("meta-unknown-version", meta_edit(version=5), "meta.json", "newer server"),
    ("meta-version-string", meta_edit(version="1"), "meta.json", "format version"),
    ("meta-unknown-key", meta_edit(colour="blue"), "meta.json", "unknown key 'colour'"),
    ("meta-base-relative", meta_edit(base="base.img"), "meta.json", "'base'"),
    ("meta-base-number", meta_edit(base=7), "meta.json", "'base'"),
    ("meta-active-string", meta_edit(active="x"), "meta.json", "'active'"),
    ("meta-device-bad", meta_edit(device="-x"), "meta.json", "'device'"),
    ("meta-base-check-bad", meta_edit(base_check={"size": -1}), "meta.json", "'base_check'"),
    ("meta-empty", write_file("meta.json", b""), "meta.json", "not valid JSON"),
    ("meta-not-json", write_file("meta.json", b"{not json"), "meta.json", "not valid JSON"),
    ("meta-nan", write_file("meta.json", b'{"size": NaN}'), "meta.json", "not valid JSON"),
    ("meta-list", write_file("meta.json", b"[1, 2]"), "meta.json", "not a JSON object"),
    ("meta-binary", write_file("meta.json", b"\xff\xfe\x00"), "meta.json", "not UTF-8"),
    ("meta-huge", write_file("meta.json", b" " * (2 * MiB)), "meta.json", "too large"),
    ("meta-a-directory", make_dir("meta.json"), "meta.json", "not a regular file"),
    ("meta-missing-with-base-given", also(remove("meta.json"), base_given), "meta.json",
     "not creating a new overlay"),
    ("meta-missing-without-base", remove("meta.json"), "meta.json",
     "not creating a new overlay"),
    ("meta-bad-with-tmp-left", also(meta_edit(size=-1), write_file("meta.json.tmp", b"{}")),
     "meta.json", "positive integer"),
    ("map-truncated", truncate("clusters.map", lambda n: n // 2), "clusters.map", "64 bytes"),
    ("map-one-byte", truncate("clusters.map", lambda n: 1), "clusters.map", "1 bytes"),
    ("map-empty", truncate("clusters.map", lambda n: 0), "clusters.map", "0 bytes"),
    ("map-missing", remove("clusters.map"), "clusters.map", "missing"),
    ("map-oversized", truncate("clusters.map", lambda n: n + 1), "clusters.map", "129 bytes"),
    ("map-byte-ff", poke("clusters.map", 5, b"\xff"), "clusters.map", "0xff at offset 5"),
    ("map-byte-03", poke("clusters.map", 127, b"\x03"), "clusters.map", "0x03 at offset 127"),
    ("map-a-directory", make_dir("clusters.map"), "clusters.map", "not a regular file"),
    ("data-missing", remove("data.img"), "data.img", "missing"),
    ("data-short", truncate("data.img", lambda n: n - 1), "data.img", "holds data up to"),
    ("data-empty", truncate("data.img", lambda n: 0), "data.img", "holds data up to"),
    ("data-longer", truncate("data.img", lambda n: n + 1), "data.img", "larger than the disk"),
    ("data-a-directory", make_dir("data.img"), "data.img", "not a regular file"),
    ("journal-a-directory", make_dir("clusters.journal.1"),
     "clusters.journal.1", "not a regular file"),
    ("only-a-journal-left", also(remove("meta.json"), remove("clusters.map"), remove("data.img")),
     "meta.json", "clusters.journal.0 exists"),
    ("base-other-size", base_truncate, "base.img", "a different base"),
    ("base-other-content", base_other_content, "base.img", "content differs"),
    ("base-missing", base_removed, "base.img", "No such file"),
    ("control-a-regular-file", control_regular_file, "ctl", "not a socket"),
    ("control-dir-missing", control_in_missing_dir, "ctl.sock", "does not exist"),
    ("default-control-a-file", write_file("control.sock", b"x"), "control.sock",
     "not a socket"),
    ("device-conflict", lambda ov, base: ["device=other"], "ov", "device=disk0, not device=other"),
]


@pytest.mark.parametrize("damage,names,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_state_directory_is_refused_and_left_as_it_was(golden, tmp_path, damage,
                                                               names, text):
    ov = tmp_path / "ov"
    shutil.copytree(golden / "ov", ov)
    base = tmp_path / "base.img"
    shutil.copy2(golden / "base.img", base)
    meta = json.loads((ov / "meta.json").read_text())
    meta["base"] = str(base)
    (ov / "meta.json").write_text(json.dumps(meta))
    extra = damage(ov, base) or []
    before = snapshot(ov, base, tmp_path / "ctl")
    line = one_error_line(run_nbdkit(tmp_path, "overlay=%s" % ov, *extra))
    assert names in line and text in line, line
    assert snapshot(ov, base, tmp_path / "ctl") == before


def test_the_table_covers_at_least_25_damages():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_the_good_copy_starts_and_serves_what_was_written(golden, tmp_path, servers, connect):
    """The control case: the same copy, undamaged, is served (so the refusals are the damage)."""
    ov = tmp_path / "ov"
    shutil.copytree(golden / "ov", ov)
    (ov / "meta.json.tmp").write_text("{}")
    srv = servers.overlay(ov)
    h = connect(srv.uri)
    assert h.pread(CS, 0) == b"\xab" * CS
    assert h.pread(1000, 3 * MiB + 10) == b"\xcd" * 1000
    assert h.pread(CS, MiB) == bytes(CS)
    with open(golden / "base.img", "rb") as f:
        f.seek(3 * MiB)
        assert h.pread(10, 3 * MiB) == f.read(10)
        f.seek(7 * MiB)
        assert h.pread(4096, 7 * MiB) == f.read(4096)
    assert not (ov / "meta.json.tmp").exists()      # a leftover is removed once meta is valid


# -- a failed start leaves nothing behind -------------------------------------

def test_new_overlay_without_base_or_size_creates_nothing(tmp_path):
    one_error_line(run_nbdkit(tmp_path, "overlay=%s" % (tmp_path / "a" / "state2")))
    assert not (tmp_path / "a").exists()


def test_new_overlay_with_unreachable_base_creates_nothing(tmp_path):
    line = one_error_line(run_nbdkit(tmp_path, "overlay=%s" % (tmp_path / "state2"),
                                     "base=nbd+unix:///?socket=%s" % (tmp_path / "nobody.sock")))
    assert "base=nbd+unix" in line
    assert not (tmp_path / "state2").exists()


def test_failed_start_in_an_existing_empty_directory_leaves_it_empty(tmp_path):
    (tmp_path / "state2").mkdir()
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    one_error_line(run_nbdkit(tmp_path, "overlay=%s" % (tmp_path / "state2"), "base=%s" % empty))
    assert os.listdir(tmp_path / "state2") == []


def test_a_new_state_directory_is_whole_and_its_map_allocated(servers, tmp_path):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, MiB)])
    servers.overlay(tmp_path / "ov", base=base).stop()
    st = os.stat(tmp_path / "ov" / "clusters.map")
    assert st.st_size == 64 and st.st_blocks > 0
    meta = json.loads((tmp_path / "ov" / "meta.json").read_text())
    assert meta["device"] == "disk0"
    assert meta["base_check"]["size"] == 4 * MiB and len(meta["base_check"]["sha256"]) == 64
    assert os.path.getsize(tmp_path / "ov" / "data.img") == 4 * MiB


# -- device= is remembered -----------------------------------------------------

def device_of(srv):
    ctl = Control(srv.control)
    try:
        return ctl("query-block")[0]["device"]
    finally:
        ctl.client.close()


def test_device_is_remembered_across_restarts(servers, tmp_path):
    srv = servers.overlay(tmp_path / "ov", size="1M", device="vda")
    assert device_of(srv) == "vda"
    srv.stop()
    srv = servers.overlay(tmp_path / "ov")
    assert device_of(srv) == "vda"
    srv.stop()
    srv = servers.overlay(tmp_path / "ov", device="vda")     # repeating it is fine
    assert device_of(srv) == "vda"


# -- directories made by an older server ---------------------------------------

def test_a_directory_without_base_check_or_device_is_still_served(golden, tmp_path, servers,
                                                                  connect):
    ov = tmp_path / "ov"
    shutil.copytree(golden / "ov", ov)
    meta = json.loads((ov / "meta.json").read_text())
    del meta["base_check"], meta["device"]
    (ov / "meta.json").write_text(json.dumps(meta))
    before = hashlib.sha256((ov / "meta.json").read_bytes()).hexdigest()
    srv = servers.overlay(ov)
    h = connect(srv.uri)
    assert h.pread(CS, 0) == b"\xab" * CS
    h.shutdown()
    assert device_of(srv) == "disk0"
    srv.stop()
    assert hashlib.sha256((ov / "meta.json").read_bytes()).hexdigest() == before
