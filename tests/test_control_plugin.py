"""The control socket of a real nbdkit process: QMP conformance, robustness, lifecycle."""

import asyncio
import json
import os
import socket
import stat
import time

from conftest import make_image
from helpers import Control

MiB = 1 << 20


def raw_session(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    f = s.makefile("rb")
    greeting = json.loads(f.readline())
    return s, f, greeting


def test_default_control_socket_lives_in_the_state_dir_with_mode_0600(servers, tmp_path):
    servers.overlay(tmp_path / "ov", size="1M")
    path = tmp_path / "ov" / "control.sock"
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    s, f, greeting = raw_session(path)
    assert greeting["QMP"]["capabilities"] == []
    assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    s.close()


def test_qemu_qmp_client_drives_a_mirror_unchanged(servers, tmp_path):
    from qemu.qmp import QMPClient
    base = make_image(tmp_path / "base.img", 8 * MiB, [(0, 8 * MiB)], seed=9)
    servers.overlay(tmp_path / "ov", base=base, control=str(tmp_path / "ctl.sock"))
    target_path = tmp_path / "t.img"
    with open(target_path, "wb") as f:
        f.truncate(8 * MiB)
    target = servers.nbdkit("file", str(target_path))

    async def main():
        qmp = QMPClient("test")
        await qmp.connect(str(tmp_path / "ctl.sock"))
        try:
            version = await qmp.execute("query-version")
            assert "qemu" in version
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"drive-mirror", "block-stream", "query-block-jobs", "block-job-change",
                    "job-dismiss", "stop", "cont"} <= names
            with qmp.listener() as listener:
                await qmp.execute("drive-mirror", {"device": "disk0", "target": target.uri,
                                                   "sync": "full"})
                seen = []
                async for event in listener:
                    seen.append(event["event"])
                    if event["event"] == "BLOCK_JOB_READY":
                        await qmp.execute("block-job-complete", {"device": "disk0"})
                    if event["event"] == "BLOCK_JOB_COMPLETED":
                        break
            assert "BLOCK_JOB_READY" in seen
            block = await qmp.execute("query-block")
            assert block[0]["active"] == target.uri
        finally:
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert target_path.read_bytes() == open(base, "rb").read()


def test_garbage_on_the_control_socket_never_disturbs_the_disk(servers, tmp_path, connect):
    disk = servers.overlay(tmp_path / "ov", size="8M", control=str(tmp_path / "ctl.sock"))
    h = connect(disk.uri)
    s, f, _ = raw_session(tmp_path / "ctl.sock")
    s.sendall(b'{"execute": "qmp_capabilities"}')
    assert "return" in json.loads(f.readline())
    bad = [b'{"execute": ', b'}\n', b'[1, 2, 3]\n', b'"just a string"\n',
           b'{"execute": "no-such-command"}\n',
           b'{"execute": "drive-mirror", "arguments": {"device": 5}}\n',
           b'{"execute": "query-block", "arguments": {"bogus": 1}}\n',
           b'{"execute": "query-block", "id": {"any": ["json"]}, "extra": 1}\n',
           b'\xff\xfe\x00garbage\n']
    for chunk in bad:
        s.sendall(chunk)
        h.pwrite(b"still serving", 0)
    s.sendall(b'{"x": "' + b"a" * (2 * MiB) + b'"}\n')          # oversized: refused, not fatal
    s.sendall(b'{"execute": "query-status", "id": "last"}\n')
    replies = []
    while True:
        msg = json.loads(f.readline())
        replies.append(msg)
        if msg.get("id") == "last":
            break
    errors = [m["error"]["class"] for m in replies if "error" in m]
    assert "CommandNotFound" in errors and "GenericError" in errors
    assert replies[-1]["return"]["running"] is True
    assert h.pread(13, 0) == b"still serving"
    s.close()


def test_commands_before_negotiation_are_refused(servers, tmp_path):
    servers.overlay(tmp_path / "ov", size="1M", control=str(tmp_path / "ctl.sock"))
    s, f, _ = raw_session(tmp_path / "ctl.sock")
    s.sendall(b'{"execute": "query-block", "id": 1}')
    reply = json.loads(f.readline())
    assert reply["id"] == 1 and reply["error"]["class"] == "CommandNotFound"
    s.close()


def test_events_reach_every_negotiated_client_in_order(servers, tmp_path):
    base = make_image(tmp_path / "base.img", 4 * MiB, [(0, MiB)], seed=2)
    servers.overlay(tmp_path / "ov", base=base, control=str(tmp_path / "ctl.sock"))
    target_path = tmp_path / "t.img"
    with open(target_path, "wb") as f:
        f.truncate(4 * MiB)
    a, b = Control(tmp_path / "ctl.sock"), Control(tmp_path / "ctl.sock")
    a("drive-mirror", device="disk0", target=str(target_path), sync="full")
    a.wait_event("BLOCK_JOB_READY")
    b.wait_event("BLOCK_JOB_READY")
    a("block-job-cancel", device="disk0")
    a.wait_status("disk0", "null")
    b.wait_status("disk0", "null")
    assert a.names() == b.names()
    stamps = [(e["timestamp"]["seconds"], e["timestamp"]["microseconds"]) for e in a.events]
    assert stamps == sorted(stamps)
    a.close()
    b.close()


def test_sigterm_with_control_clients_connected_exits_promptly(servers, tmp_path):
    disk = servers.overlay(tmp_path / "ov", size="1M", control=str(tmp_path / "ctl.sock"))
    qmp = Control(tmp_path / "ctl.sock")
    t0 = time.monotonic()
    assert disk.stop(timeout=15) == 0
    assert time.monotonic() - t0 < 10
    qmp.close()
