"""Relative paths jobctl sends are made absolute against the caller's directory."""

import pytest

from jobctl.commands.qmp import cmd_qmp
from jobctl.commands.start import cmd_mirror
from jobctl.parser import parse_args
from jobctl.paths import absolute_nbd_uri, absolute_path, absolute_target

CWD = "/home/op/work"


@pytest.mark.parametrize("target, expected", [
    ("target.img", "/home/op/work/target.img"),
    ("./target.img", "/home/op/work/target.img"),
    ("disks/t.img", "/home/op/work/disks/t.img"),
    ("../t.img", "/home/op/work/../t.img"),
    ("/srv/t.img", "/srv/t.img"),
])
def test_file_target_is_joined_to_the_cwd(target, expected):
    assert absolute_target(target, CWD) == expected


@pytest.mark.parametrize("uri, expected", [
    ("nbd+unix:///?socket=t.sock", "nbd+unix:///?socket=/home/op/work/t.sock"),
    ("nbd+unix:///export?socket=./run/t.sock",
     "nbd+unix:///export?socket=/home/op/work/run/t.sock"),
    ("nbds+unix:///e?socket=t.sock&tls-psk-file=keys.psk",
     "nbds+unix:///e?socket=/home/op/work/t.sock&tls-psk-file=/home/op/work/keys.psk"),
    ("nbds://host:10809/e?tls-psk-file=keys.psk&tls-username=alice",
     "nbds://host:10809/e?tls-psk-file=/home/op/work/keys.psk&tls-username=alice"),
    ("nbds://host/e?tls-certificates=pki", "nbds://host/e?tls-certificates=/home/op/work/pki"),
])
def test_nbd_uri_path_parameters_are_made_absolute(uri, expected):
    assert absolute_target(uri, CWD) == expected


@pytest.mark.parametrize("uri", [
    "nbd://host:10809/export",
    "nbd+unix:///?socket=/run/t.sock",
    "nbds://host/e?tls-psk-file=/etc/keys.psk&tls-verify-peer=false",
    "nbd+vsock://3:10809/e",
])
def test_uris_without_relative_paths_are_unchanged(uri):
    assert absolute_target(uri, CWD) == uri


def test_other_schemes_are_left_for_the_server_to_judge():
    assert absolute_target("http://example.com/disk.img", CWD) == "http://example.com/disk.img"


def test_percent_encoded_paths_are_decoded_then_encoded_again():
    uri = "nbd+unix:///?socket=my%20dir/t%26.sock"
    assert absolute_nbd_uri(uri, CWD) == "nbd+unix:///?socket=/home/op/work/my%20dir/t%26.sock"


def test_other_parameters_keep_their_exact_text():
    uri = "nbd+unix:///e?tls=require&socket=s.sock&x=%41"
    assert absolute_nbd_uri(uri, CWD) == "nbd+unix:///e?tls=require&socket=/home/op/work/s.sock&x=%41"


def test_dot_is_the_cwd():
    assert absolute_path(".", CWD) == CWD


class Recorder:
    """Records the commands a command function sends (no server involved)."""

    def __init__(self):
        self.calls = []

    def execute(self, command, arguments=None):
        self.calls.append((command, arguments))
        return {}


def test_mirror_command_sends_an_absolute_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = Recorder()
    cmd_mirror(client, parse_args(["mirror", "disk0", "nbd+unix:///?socket=t.sock"]))
    [(command, arguments)] = client.calls
    assert (command, arguments["target"]) == ("drive-mirror", f"nbd+unix:///?socket={tmp_path}/t.sock")


def test_qmp_drive_mirror_target_is_made_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    client = Recorder()
    cmd_qmp(client, parse_args(["qmp", "drive-mirror",
                                '{"device": "disk0", "target": "t.img", "sync": "full"}']))
    assert client.calls == [("drive-mirror", {"device": "disk0", "target": f"{tmp_path}/t.img",
                                              "sync": "full"})]


def test_qmp_other_commands_are_sent_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    client = Recorder()
    cmd_qmp(client, parse_args(["qmp", "x-other", '{"target": "t.img"}']))
    assert client.calls == [("x-other", {"target": "t.img"})]
