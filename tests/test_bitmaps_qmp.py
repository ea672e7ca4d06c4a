"""Dirty-bitmap QMP commands against QEMU's semantics (qemu-storage-daemon 7.2 as the reference).

The same commands go to our server and to a qemu-storage-daemon serving a qcow2
disk as node disk0; the answers (return values or error class and text) must be
equal.  Then what QSD cannot show: busy bitmaps (no job of ours holds one yet, so
the disk-layer API is driven in process), transactions that stop half way, no
client write between a transaction's actions, and the extents command.
"""

import os
import random
import threading

import nbd
import pytest

from bitmap_rig import MiB, answer, extents, granules, our_bitmaps, qsd, qsd_bitmaps
from helpers import Control

SIZE = 64 * MiB
BUSY = "Bitmap 'b1' is currently in use by another operation and cannot be used"


@pytest.fixture
def ours(servers, tmp_path):
    srv = servers.overlay(tmp_path / "ov", size=SIZE)
    control = Control(tmp_path / "ov" / "control.sock")
    yield srv, control
    control.close()


def _add(name, **kw):
    return ("block-dirty-bitmap-add", dict(node="disk0", name=name, **kw))


def _named(verb, name, node="disk0"):
    return ("block-dirty-bitmap-" + verb, {"node": node, "name": name})


def _merge(target, bitmaps, node="disk0"):
    return ("block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": bitmaps})


def _tx(*actions, **kw):
    return ("transaction", dict(actions=[{"type": t, "data": d} for t, d in actions], **kw))


# Each step: (command, arguments); both servers must answer alike.
SCRIPT = [
    _add("b1"),
    _add("b1"),                                      # Bitmap already exists: b1
    ("block-dirty-bitmap-add", {"node": "nope", "name": "b2"}),
    _add("b2", granularity=1000),                    # Granularity must be power of 2 ...
    _add("b2", granularity=256),
    _add("b2", granularity=0),
    _add(""),                                        # Bitmap name cannot be empty
    _add("y" * 1024),                                # Bitmap name too long: ...
    _add("y" * 1023),
    _add("p1", persistent=True, granularity=1 << 20),
    _add("d1", disabled=True),
    _add("g", granularity=64 << 20),
    _named("remove", "zz"),                          # Dirty bitmap 'zz' not found
    _named("remove", "zz", node="nope"),             # Node 'nope' not found
    _named("clear", "zz"), _named("enable", "zz"), _named("disable", "zz"),
    _named("enable", "b1"), _named("disable", "d1"), _named("enable", "d1"),
    _named("disable", "d1"),
    _merge("zz", ["b1"]),
    _merge("b1", ["zz"]),
    _merge("b1", [{"node": "nope", "name": "d1"}]),
    _merge("b1", [{"node": "disk0", "name": "zz"}]),
    _merge("b1", [{"node": "disk0", "name": "d1"}, "p1"]),
    _merge("b1", [{"name": "d1"}]),                  # Parameter 'bitmaps[0].node' is missing
    _merge("g", ["b1"]),                             # another granularity
    _tx(),
    _tx(_add("t1"), _add("t1")),
    _tx(_add("t1"), ("abort", {})),                  # Transaction aborted using Abort action
    ("transaction", {"actions": [{"type": "bogus", "data": {}}]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "disk0"}}]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add"}]}),
    ("transaction", {"actions": [{"data": {}}]}),
    ("transaction", {"actions": [5]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "disk0", "name": 5}}]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "disk0", "name": "z", "bogus": 1}}]}),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add",
                                  "data": {"node": "disk0", "name": "z"}, "extra": 1}]}),
    _tx(_add("t2"), _named("remove", "t2")),
    _tx(_add("t3"), properties={}),
    _tx(_add("t4"), properties={"completion-mode": "grouped"}),
    _tx(_named("enable", "t3"), _named("disable", "t3")),
    _tx(_add("t5"), _merge("t5", ["b1", "p1"]), _named("clear", "b1")),
    _tx(("block-dirty-bitmap-add", {"node": "nope", "name": "z"})),
    _tx(_named("remove", "z", node="nope")),
    _named("remove", "y" * 1023),
]


def _write_pattern(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x01" * 4096, 1 * MiB)
    h.pwrite(b"\x02" * (3 * MiB), 5 * MiB + 512)
    h.zero(MiB, 20 * MiB)
    h.trim(2 * MiB, 30 * MiB)
    h.flush()
    h.shutdown()


def _shape(bitmaps):
    """What both servers must agree on; QSD lists a node's bitmaps newest first too."""
    return [{k: b[k] for k in ("name", "recording", "persistent", "busy", "granularity",
                               "count")} for b in bitmaps]


def test_commands_answer_as_qemu_storage_daemon(servers, tmp_path, ours):
    ref_server, ref = qsd(servers, tmp_path, SIZE)
    srv, control = ours
    for i, (command, args) in enumerate(SCRIPT):
        if i == 12:                                  # some bitmaps, then some writes
            _write_pattern(srv.uri)
            _write_pattern(ref_server.uri)
            assert _shape(our_bitmaps(control)) == _shape(qsd_bitmaps(ref))
        args = {k.replace("-", "_"): v for k, v in args.items()}
        got, want = answer(control, command, **args), answer(ref, command, **args)
        assert got == want, "step %d %s %r" % (i, command, args)
    assert _shape(our_bitmaps(control)) == _shape(qsd_bitmaps(ref))
    ref.close()


def test_busy_text_is_qemu_storage_daemons(servers, tmp_path):
    """QSD's texts for a bitmap a backup job holds (ours are checked in process below)."""
    ref_server, ref = qsd(servers, tmp_path, SIZE)
    ref("block-dirty-bitmap-add", node="disk0", name="b1")
    ref("block-dirty-bitmap-add", node="disk0", name="b2")
    h = nbd.NBD()
    h.connect_uri(ref_server.uri)
    h.pwrite(os.urandom(32 * MiB), 0)
    h.shutdown()
    target = tmp_path / "t.qcow2"
    import subprocess
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(SIZE)],
                   check=True)
    ref("blockdev-add", driver="qcow2", node_name="tgt",
        file={"driver": "file", "filename": str(target)})
    ref("blockdev-backup", job_id="j", device="disk0", target="tgt", sync="full",
        bitmap="b1", bitmap_mode="always", speed=1)
    for command, args in (_named("remove", "b1"), _named("clear", "b1"),
                          _named("enable", "b1"), _named("disable", "b1"),
                          _merge("b1", ["b2"]), _merge("b2", ["b1"]),
                          _tx(_add("t1"), _named("clear", "b1"))):
        assert answer(ref, command, **args) == ("error", "GenericError", BUSY)
    assert "t1" not in [b.get("name") for b in qsd_bitmaps(ref)]
    ref("block-job-cancel", device="j", force=True)
    ref.close()


class _NullDisk:
    """What a BitmapSet needs of its disk, for the in-process tests."""
    size = SIZE
    device = "disk0"

    def set_marker(self, fn):
        pass


def test_a_busy_bitmap_refuses_what_would_change_it():
    """The disk layer's busy API (a backup job will hold its bitmap busy): the
    refusals carry QSD's text (test above)."""
    from plugin.core.errors import CommandError
    from plugin.disk.bitmaps import BitmapSet

    bitmaps = BitmapSet(_NullDisk(), None, SIZE, 65536)
    change = bitmaps.change()
    change.add("b1")
    change.add("b2")
    change.commit()
    bitmaps.set_busy("b1")
    with pytest.raises(CommandError) as again:
        bitmaps.set_busy("b1")
    assert again.value.desc == BUSY
    for verb, args in (("remove", ("b1",)), ("clear", ("b1",)), ("enable", ("b1",)),
                       ("disable", ("b1",)), ("merge", ("b1", [(None, "b2")])),
                       ("merge", ("b2", [(None, "b1")]))):
        change = bitmaps.change()
        with pytest.raises(CommandError) as refused:
            getattr(change, verb)(*args)
        change.abort()
        assert refused.value.desc == BUSY, verb
    assert [(b["name"], b["busy"]) for b in bitmaps.info()] == [("b2", False), ("b1", True)]
    bitmaps.set_busy("b1", False)
    change = bitmaps.change()
    change.remove("b1")
    change.commit()
    assert bitmaps.names() == ["b2"]


def test_a_transaction_that_fails_changes_nothing(ours, tmp_path):
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="a", persistent=True)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"x" * 65536, 0)
    before = our_bitmaps(control)
    files = sorted(os.listdir(tmp_path / "ov" / "bitmaps"))
    for actions in ([_add("x", persistent=True), _named("clear", "a"), ("abort", {})],
                    [_named("disable", "a"), _add("y"), _named("remove", "nope")],
                    [_named("remove", "a"), _merge("a", ["a"])]):
        reply = answer(control, "transaction",
                       actions=[{"type": t, "data": d} for t, d in actions])
        assert reply[0] == "error"
        assert our_bitmaps(control) == before
        assert sorted(os.listdir(tmp_path / "ov" / "bitmaps")) == files
    h.shutdown()
    srv.stop()
    srv2 = srv.__class__(srv.argv, srv.sock, str(tmp_path / "again.log"), control=srv.control)
    srv2.wait_ready()
    try:
        control2 = Control(tmp_path / "ov" / "control.sock")
        assert our_bitmaps(control2) == before
        control2.close()
    finally:
        srv2.stop()


def test_no_client_write_lands_between_a_transactions_actions(ours):
    """Writers never stop; each transaction clears `a` and adds `b`: from that
    instant both see the same writes, so their extents must be equal."""
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="a")
    stop = threading.Event()
    errors = []

    def writer(seed):
        rnd = random.Random(seed)
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        try:
            while not stop.is_set():
                h.pwrite(b"w" * 4096, rnd.randrange(SIZE // 4096) * 4096)
        except Exception as e:          # reported below
            errors.append(e)
        finally:
            h.shutdown()

    for round_ in range(6):
        stop.clear()
        threads = [threading.Thread(target=writer, args=(round_ * 2 + i,)) for i in range(2)]
        for t in threads:
            t.start()
        # A persistent add between the two (file writes and syncs: the GIL is
        # released for a while, so an unquiesced writer would get in).
        control("transaction", actions=[
            {"type": "block-dirty-bitmap-clear", "data": {"node": "disk0", "name": "a"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "p", "persistent": True}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b"}}])
        for _ in range(3):
            our_bitmaps(control)           # let the writers go on for a while
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        a, b = extents(control, "a"), extents(control, "b")
        assert a == b and a, round_
        control("block-dirty-bitmap-remove", node="disk0", name="b")
        control("block-dirty-bitmap-remove", node="disk0", name="p")


def test_extents_are_granule_ranges_in_order_and_paged(ours):
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="g64k")
    control("block-dirty-bitmap-add", node="disk0", name="g1m", granularity=MiB)
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    writes = [(0, 512), (3 * MiB + 100, 70000), (10 * MiB, 4096), (10 * MiB + 65536, 4096),
              (SIZE - 4096, 4096)]
    for offset, length in writes:
        h.pwrite(b"z" * length, offset)
    h.shutdown()
    for name, g in (("g64k", 65536), ("g1m", MiB)):
        want = []
        for offset, length in sorted(granules(o, n, g) for o, n in writes):
            if want and want[-1][0] + want[-1][1] >= offset:
                last = want.pop()
                offset, length = last[0], max(last[0] + last[1], offset + length) - last[0]
            want.append((offset, length))
        assert extents(control, name) == want
        assert extents(control, name, page=1) == want
        count = [b for b in our_bitmaps(control) if b["name"] == name][0]["count"]
        assert count == sum(n for _, n in want)
    window = control("x-block-dirty-bitmap-extents", node="disk0", name="g1m",
                     offset=3 * MiB + 10, length=MiB)
    assert window == {"extents": [{"offset": 3 * MiB + 10, "length": MiB - 10}]}
    assert answer(control, "x-block-dirty-bitmap-extents", node="disk0", name="g1m",
                  offset=SIZE + 1)[0] == "error"
    assert answer(control, "x-block-dirty-bitmap-extents", node="disk0", name="nope") == (
        "error", "GenericError", "Dirty bitmap 'nope' not found")
    assert answer(control, "x-block-dirty-bitmap-extents", node="x", name="g1m") == (
        "error", "GenericError", "Node 'x' not found")


def test_merge_of_an_empty_list_is_harmless(ours):
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="a")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"z" * 4096, MiB)
    h.shutdown()
    before = our_bitmaps(control)
    assert control("block-dirty-bitmap-merge", node="disk0", target="a", bitmaps=[]) == {}
    assert our_bitmaps(control) == before
    assert answer(control, "block-dirty-bitmap-merge", node="disk0", target="b",
                  bitmaps=[]) == ("error", "GenericError", "Dirty bitmap 'b' not found")


def test_non_persistent_bitmaps_end_with_the_process(ours, servers):
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="temp")
    control("block-dirty-bitmap-add", node="disk0", name="kept", persistent=True)
    control.close()
    srv.stop()
    servers.restart(srv)
    again = Control(srv.control)
    assert [b["name"] for b in our_bitmaps(again)] == ["kept"]
    again.close()


def test_a_name_removed_and_added_again_in_one_transaction_survives_a_restart(ours, servers,
                                                                              tmp_path):
    srv, control = ours
    control("block-dirty-bitmap-add", node="disk0", name="x", persistent=True)
    control("transaction", actions=[
        {"type": "block-dirty-bitmap-remove", "data": {"node": "disk0", "name": "x"}},
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "disk0", "name": "x", "persistent": True, "granularity": MiB}}])
    assert sorted(os.listdir(tmp_path / "ov" / "bitmaps")) == ["00000002.bitmap", "regions"]
    control.close()
    srv.kill9()
    servers.restart(srv)
    again = Control(srv.control)
    assert [(b["name"], b["granularity"]) for b in our_bitmaps(again)] == [("x", MiB)]
    again.close()
