"""What `pip install .` installs: one top-level package, and its nbdkit script works."""

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, Server


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True)
    [path] = out.glob("*.whl")
    return path


def test_the_wheel_installs_no_top_level_plugin_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"overlay_nbd"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "overlay_nbd/plugin/overlaydisk.py" in names
    assert "overlay_nbd/jobctl/cli.py" in names
    assert "overlay_nbd/jobctl/commands/start.py" in names


@pytest.mark.slow
def test_the_installed_nbdkit_script_serves_a_disk(wheel, tmp_path, servers, connect):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    script = site / "overlay_nbd" / "plugin" / "overlaydisk.py"
    sock = tmp_path / "d.sock"
    ctl = tmp_path / "ov" / "control.sock"
    argv = ["nbdkit", "-f", "-U", str(sock), "python", str(script),
            "overlay=%s" % (tmp_path / "ov"), "size=1M"]
    server = Server(argv, sock, tmp_path / "d.log", control=str(ctl))
    servers.started.append(server)
    server.wait_ready()
    h = connect(server.uri)
    h.pwrite(b"installed", 4096)
    assert h.pread(9, 4096) == b"installed"
    assert h.get_size() == 1 << 20
