"""Threads the system can tell apart (plugin/core/threads.py): each of ours gives its
native thread its Python name, so `top -H`, `ps -L`, perf and /proc/PID/task show
which job uses the CPU."""

import os
import threading


from conftest import make_image
from faults import wait_until
from helpers import Control
from plugin.core.threads import COMM_BYTES, Thread

MiB = 1 << 20


def _task_names(pid):
    names = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().rstrip("\n"))
        except FileNotFoundError:
            pass                # the thread ended meanwhile
    return names


def test_a_thread_takes_its_name_cut_to_the_kernels_length():
    seen, go_on = [], threading.Event()

    def body():
        with open("/proc/thread-self/comm") as f:
            seen.append(f.read().rstrip("\n"))
        go_on.wait(10)

    t = Thread(target=body, name="job-a-rather-long-job-id", daemon=True)
    t.start()
    assert wait_until(lambda: seen, 10)
    assert seen == ["job-a-rather-long-job-id"[:COMM_BYTES]]
    assert "job-a-rather-lo" in _task_names(os.getpid())
    go_on.set()
    t.join(10)
    # The thread that started it keeps its own name.
    with open("/proc/thread-self/comm") as f:
        assert f.read().rstrip("\n") != seen[0]


def test_the_servers_job_and_control_threads_are_named_in_proc(servers, tmp_path):
    base = make_image(tmp_path / "base.img", 16 * MiB, [(0, 16 * MiB)], seed=3)
    ctl = tmp_path / "ctl.sock"
    disk = servers.overlay(tmp_path / "ov", base=base, control=str(ctl))
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(16 * MiB)
    target_server = servers.nbdkit("file", str(target))
    qmp = Control(ctl)
    try:
        # 64 KiB/s: the job is still copying while the test looks.
        qmp("drive-mirror", device="disk0", target=target_server.uri, sync="full",
            speed=65536)
        assert wait_until(lambda: "job-disk0" in _task_names(disk.pid), 10), \
            _task_names(disk.pid)
        names = _task_names(disk.pid)
        assert "qmp-control" in names
        assert "nbdkit" in names            # nbdkit's own threads keep theirs
        qmp("block-job-cancel", device="disk0", force=True)
    finally:
        qmp.close()
