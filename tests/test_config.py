"""Bad configuration stops nbdkit at start-up with one clear line."""

import subprocess

import pytest

from conftest import PLUGIN, make_image

MiB = 1 << 20


def start_fails(tmp_path, *params):
    argv = ["nbdkit", "-f", "-U", str(tmp_path / "x.sock"), "python", str(PLUGIN), *params]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr                   # one line, no traceback
    assert lines[0].startswith("nbdkit: overlay: error: ")
    return lines[0]


def test_missing_overlay(tmp_path):
    assert "overlay=STATE_DIR is required" in start_fails(tmp_path, "size=1M")


def test_unknown_key(tmp_path):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "size=1M", "colour=blue")
    assert "unknown parameter 'colour'" in line and "see docs/plugin-keys.md" in line


def test_plugin_keys_page_lists_every_key():
    from plugin.config import Config
    page = (PLUGIN.parent.parent / "docs" / "plugin-keys.md").read_text()
    for key in Config.KEYS:
        assert "| `%s` |" % key in page, key


def test_base_not_found(tmp_path):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "base=%s" % (tmp_path / "nope"))
    assert "no such file" in line


def test_unreachable_nbd_base(tmp_path):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"),
                       "base=nbd+unix:///?socket=%s" % (tmp_path / "nobody.sock"))
    assert "base=nbd+unix" in line


def test_new_overlay_needs_base_or_size(tmp_path):
    assert "needs base= or size=" in start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"))


def test_bad_size(tmp_path):
    assert "not a size" in start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "size=lots")


@pytest.mark.parametrize("value", ["1000", "3K", "4M"])
def test_bad_cluster_size(tmp_path, value):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "size=1M",
                       "cluster-size=%s" % value)
    assert "power of 2" in line


def test_size_conflicting_with_state_dir(servers, tmp_path):
    srv = servers.overlay(tmp_path / "ov", size="8M")
    srv.stop()
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "size=16M")
    assert "has size 8388608, not size=16777216" in line


def test_base_conflicting_with_state_dir(servers, tmp_path):
    a = make_image(tmp_path / "a.img", MiB)
    b = make_image(tmp_path / "b.img", MiB)
    servers.overlay(tmp_path / "ov", base=a).stop()
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "base=%s" % b)
    assert "was created with base=%s" % a in line


def test_cluster_size_conflicting_with_state_dir(servers, tmp_path):
    servers.overlay(tmp_path / "ov", size="1M", cluster_size="64K").stop()
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "cluster-size=128K")
    assert "cluster-size" in line


def test_state_dir_in_use_by_another_server(servers, tmp_path):
    servers.overlay(tmp_path / "ov", size="1M")
    assert "in use by another server" in start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"))


def test_corrupt_meta(tmp_path):
    (tmp_path / "ov").mkdir()
    (tmp_path / "ov" / "meta.json").write_text("{not json")
    assert "corrupt" in start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"))


def test_restart_with_same_values_repeated_is_fine(servers, tmp_path):
    a = make_image(tmp_path / "a.img", MiB)
    servers.overlay(tmp_path / "ov", base=a).stop()
    servers.overlay(tmp_path / "ov", base=a, size=str(MiB)).stop()


@pytest.mark.parametrize("value", ["-1", "soon", "1e9"])
def test_bad_reconnect_delay(tmp_path, value):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "size=1M",
                       "reconnect-delay=" + value)
    assert "reconnect-delay=%s: must be a number of seconds" % value in line


def test_rbd_base_with_a_relative_conf(tmp_path):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "base=rbd://p/i?conf=ceph.conf")
    assert line.endswith("base=rbd://p/i?conf=ceph.conf: rbd address conf=ceph.conf must be an "
                         "absolute path (the server runs in /)")


def test_bad_rbd_base_address(tmp_path):
    line = start_fails(tmp_path, "overlay=%s" % (tmp_path / "ov"), "base=rbd://pool-only")
    assert "base=rbd://pool-only: rbd address must be rbd://POOL/IMAGE" in line
