"""drive-mirror refuses a target with a relative path in it (issue 12 §1, server side):
the server's working directory is not the caller's."""

import pytest

from conftest import make_image
from jobctl.qmp_client import QMPError
from plugin.qmp.target_paths import relative_paths
from helpers import Control

MiB = 1 << 20


@pytest.mark.parametrize("target,bad", [
    ("target.img", [("target", "target.img")]),
    ("./t/target.img", [("target", "./t/target.img")]),
    ("/abs/target.img", []),
    ("nbd+unix:///?socket=target.sock", [("socket", "target.sock")]),
    ("nbd+unix:///exp?socket=/abs/t.sock", []),
    ("nbds+unix:///?socket=/abs/t.sock&tls-psk-file=keys.psk", [("tls-psk-file", "keys.psk")]),
    ("nbds://host:10809/?tls-certificates=pki", [("tls-certificates", "pki")]),
    ("nbd://127.0.0.1:10809/export", []),
])
def test_relative_paths_are_found_in_files_and_nbd_uri_queries(target, bad):
    assert relative_paths(target) == bad


@pytest.mark.parametrize("target,what", [
    ("target.img", "target: relative path 'target.img'"),
    ("nbd+unix:///?socket=target.sock", "socket= in target: relative path 'target.sock'"),
    ("nbds+unix:///?socket=%(tmp)s/t.sock&tls-psk-file=keys.psk",
     "tls-psk-file= in target: relative path 'keys.psk'"),
])
def test_drive_mirror_refuses_a_relative_path_and_starts_nothing(servers, tmp_path, target, what):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, MiB)])
    srv = servers.overlay(tmp_path / "ov", base=base)
    ctl = Control(srv.control)
    with pytest.raises(QMPError) as refused:
        ctl("drive-mirror", device="disk0", target=target % {"tmp": tmp_path}, sync="full")
    text = str(refused.value)
    assert what in text and "is not accepted" in text and "working directory" in text, text
    assert ctl("query-block-jobs") == []
    ctl.client.close()
