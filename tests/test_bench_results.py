"""scripts/benchlib: result tables (spread, CPU per GiB, the anchor-drift rule) and CpuMeter."""

import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from benchlib.bench import Bench  # noqa: E402
from benchlib.cpu import CpuMeter, descendants  # noqa: E402
from benchlib.fio import fio  # noqa: E402
from benchlib.smallio import Workload  # noqa: E402
from benchlib.results import (GIB, Goal, Group, missed_goals, render,  # noqa: E402
                              unjudged_goals)


def _line(text, label):
    """The rendered line of the row whose label starts it."""
    return next(l for l in text.splitlines() if l.startswith(label))


def _json_row(group, key):
    return next(r for r in group.to_json()["rows"] if r["key"] == key)


# -- results.py ------------------------------------------------------------------------

def _mirror_group(anchor_samples, ours_samples, goal=Goal(0.8)):
    g = Group("mirror", "ready", "mirror until READY", "s", data_bytes=GIB)
    g.row("qemu", "qsd", anchor=True)
    g.row("overlay", "ours", goal=goal)
    for a, o in zip(anchor_samples, ours_samples):
        g.add("qemu", a, cpu=0.5)
        g.add("overlay", o, cpu=1.0)
    return g


def test_render_shows_cpu_per_gib_and_its_ratio_to_the_anchor():
    g = Group("mirror", "ready", "mirror", "s", data_bytes=2 * GIB)
    g.row("qemu", "qsd", anchor=True)
    g.row("overlay", "ours")
    for a, o, ca, co in ((1.0, 0.9, 1.0, 3.0), (1.0, 1.0, 1.0, 2.0), (1.0, 1.1, 2.0, 2.0)):
        g.add("qemu", a, cpu=ca)
        g.add("overlay", o, cpu=co)
    text = render(g)
    header = text.splitlines()[1]
    assert "CPU s/GiB" in header and "CPU ratio" in header
    # 2 GiB per sample: 3, 2, 2 CPU seconds are 1.5, 1.0, 1.0 s/GiB; median 1.0.
    # Per-run CPU ratios 3.0, 2.0, 1.0: median 2.0 (not 1.0/0.5 of the medians).
    assert _line(text, "ours").split()[-2:] == ["1.000", "2.00"]
    row = _json_row(g, "overlay")
    assert row["cpu_samples"] == [1.5, 1.0, 1.0]
    assert row["cpu_s_per_gib"] == 1.0
    assert row["cpu_ratio"] == 2.0
    assert _json_row(g, "qemu")["cpu_ratio"] == 1.0


def test_cpu_of_a_group_without_data_bytes_is_divided_by_the_bytes_given():
    g = Group("smallio", "randwrite", "fio", "IOPS")
    g.row("naive", "naive", anchor=True)
    g.add("naive", 1000.0, cpu=0.25, data=GIB // 4)
    assert g.rows["naive"].cpu_samples == [1.0]
    with pytest.raises(ValueError):
        g.add("naive", 1000.0, cpu=0.25)


def test_no_cpu_columns_without_cpu_readings():
    g = Group("overlay", "startup", "start-up", "ms")
    g.row("trivial", "trivial", anchor=True)
    g.row("fresh", "fresh")
    for v in (10.0, 11.0, 12.0):
        g.add("trivial", v)
        g.add("fresh", 2 * v)
    assert "CPU" not in render(g)
    assert g.rows["fresh"].cpu_samples == [None, None, None]
    assert _json_row(g, "fresh")["cpu_samples"] is None
    assert _json_row(g, "fresh")["cpu_s_per_gib"] is None


def test_spread_of_the_samples_and_of_the_per_run_ratios():
    g = _mirror_group([1.0, 1.0, 1.0], [0.6, 0.8, 0.7], goal=None)
    text = render(g)
    assert "spread" in text.splitlines()[1] and "r.spread" in text.splitlines()[1]
    # (0.8 - 0.6) / 0.7 = 29%; the ratios are the samples here (the anchor is 1.0).
    assert _json_row(g, "overlay")["spread"] == pytest.approx(0.2 / 0.7)
    assert _json_row(g, "overlay")["ratio_spread"] == pytest.approx(0.2 / 0.7)
    assert _json_row(g, "qemu")["spread"] == 0.0
    assert _json_row(g, "qemu")["ratio_spread"] is None
    assert "29%" in _line(text, "ours")


def test_ratio_spread_follows_the_runs_not_the_samples():
    # The row swings with the anchor (a load spike hit both): its per-run ratios do not.
    g = _mirror_group([1.0, 2.0, 1.5], [0.7, 1.4, 1.05], goal=None)
    row = _json_row(g, "overlay")
    assert row["spread"] == pytest.approx(0.7 / 1.05)
    assert row["ratio_spread"] == pytest.approx(0.0, abs=1e-9)


def test_an_anchor_that_moved_more_than_20_percent_judges_no_goal():
    g = _mirror_group([1.0, 1.3, 1.0], [1.2, 1.2, 1.2])    # ratio 1.2: would miss <= 0.8
    row = g.rows["overlay"]
    assert g.goal_met(row) is None
    assert missed_goals([g]) == []
    assert unjudged_goals([g]) == [(g, row)]
    line = _line(render(g), "ours")
    assert "anchor moved 30%" in line
    assert line.endswith("?")
    data = g.to_json()
    assert data["anchor_spread"] == pytest.approx(0.3)
    assert _json_row(g, "overlay")["judged"] is False
    assert _json_row(g, "overlay")["goal_met"] is None
    assert _json_row(g, "qemu")["judged"] is None      # no goal


def test_an_anchor_within_20_percent_judges():
    g = _mirror_group([10.0, 12.0, 10.0], [12.0, 12.0, 12.0])   # spread exactly 20%
    assert g.goal_met(g.rows["overlay"]) is False
    assert missed_goals([g]) == [(g, g.rows["overlay"])]
    assert unjudged_goals([g]) == []
    assert _line(render(g), "ours").endswith("MISSED")
    assert "moved" not in render(g)
    assert _json_row(g, "overlay")["judged"] is True
    ok = _mirror_group([10.0, 12.0, 10.0], [7.0, 7.0, 7.0])
    assert _line(render(ok), "ours").endswith("ok")


def test_anchor_drift_leaves_absolute_goals_judged():
    g = Group("overlay", "memory", "RSS", "MiB")
    g.row("base", "anchor", anchor=True)
    g.row("sparse", "ours", goal=Goal(100, relative=False, strict=True))
    for a, s in ((10.0, 120.0), (20.0, 120.0), (30.0, 120.0)):
        g.add("base", a)
        g.add("sparse", s)
    assert g.goal_met(g.rows["sparse"]) is False
    assert _json_row(g, "sparse")["judged"] is True


def test_a_goal_relative_to_another_row_looks_at_that_row_moving():
    g = Group("smallio", "randwrite", "fio", "IOPS")
    g.row("naive", "naive", anchor=True)
    g.row("qemu", "qemu-nbd")
    g.row("ours", "ours", goal=Goal(1.0, at_least=True, ref="qemu"))
    for n, q, o in ((100.0, 100.0, 50.0), (100.0, 200.0, 50.0), (100.0, 150.0, 50.0)):
        g.add("naive", n)
        g.add("qemu", q)
        g.add("ours", o)
    assert g.goal_met(g.rows["ours"]) is None
    assert "qemu moved 67%" in _line(render(g), "ours")


# -- cpu.py ------------------------------------------------------------------------------

# A process that burns CPU on request: "burn S" (S seconds of its own CPU time,
# however loaded the machine), "spawn S" (a child of its own that burns S and
# stays alive), "reap" (end that child and wait for it), "exit".  Answers "done".
# With an argument S it burns S seconds and exits.
WORKER = '''\
import subprocess, sys, time

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

if len(sys.argv) > 1:
    burn(float(sys.argv[1]))
    sys.exit(0)
kid = None
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "burn":
        burn(float(arg))
    elif cmd == "spawn":
        kid = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        kid.stdin.write("burn %s\\n" % arg)
        kid.stdin.flush()
        kid.stdout.readline()
    elif cmd == "reap":
        kid.stdin.close()
        kid.wait()
    elif cmd == "exit":
        break
    print("done", flush=True)
'''


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    started = []

    def start():
        p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(p)
        return p

    start.script = script
    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def _ask(p, command):
    p.stdin.write(command + "\n")
    p.stdin.flush()
    assert p.stdout.readline() == "done\n"


def test_cpu_meter_measures_a_server_between_start_and_stop(worker):
    p = worker()
    _ask(p, "burn 0.5")                 # before the meter: must not count
    meter = CpuMeter([p.pid], clients=False).start()
    _ask(p, "burn 0.3")
    seconds = meter.stop()
    assert 0.1 < seconds < 0.7
    assert meter.seconds == seconds
    idle = CpuMeter([p.pid], clients=False).start()
    assert idle.stop() < 0.1


def test_cpu_meter_counts_descendants_alive_or_reaped(worker):
    p = worker()
    _ask(p, "burn 0.1")
    meter = CpuMeter([p.pid], clients=False).start()
    _ask(p, "spawn 0.3")                # a grandchild burns and stays alive
    assert len(descendants([p.pid])) == 2
    assert 0.1 < meter.stop() < 0.7
    # Reaped, the grandchild's time moves into the child's cutime: counted once.
    meter.start()
    _ask(p, "reap")
    assert meter.stop() < 0.1
    meter.start()
    _ask(p, "spawn 0.3")
    _ask(p, "reap")
    assert 0.1 < meter.stop() < 0.7


def test_cpu_meter_counts_clients_run_and_waited_for(worker):
    meter = CpuMeter().start()
    subprocess.run([sys.executable, str(worker.script), "0.3"], check=True)
    assert 0.1 < meter.stop() < 0.7


def test_cpu_meter_counts_a_server_that_exits_during_the_measurement(worker):
    p = worker()
    _ask(p, "burn 0.5")
    meter = CpuMeter([p.pid]).start()
    _ask(p, "burn 0.3")
    p.stdin.write("exit\n")
    p.stdin.flush()
    p.wait()
    assert 0.1 < meter.stop() < 0.7     # its life before start() is not counted


def test_cpu_meter_without_clients_refuses_a_server_that_exited(worker):
    p = worker()
    _ask(p, "burn 0.01")
    meter = CpuMeter([p.pid], clients=False).start()
    p.stdin.close()
    p.wait()
    with pytest.raises(RuntimeError, match="exited"):
        meter.stop()


def test_bench_timed_cpu_measures_the_command(worker, tmp_path):
    bench = Bench(str(tmp_path), runs=3, size=GIB, quick=True)
    seconds, cpu = bench.timed_cpu([sys.executable, str(worker.script), "0.3"])
    assert 0.1 < cpu < 0.7
    assert seconds >= 0.1


def test_fio_reports_iops_and_the_cpu_of_its_jobs(servers, tmp_path):
    """Against nbdkit null (C): the keys of fio's JSON report that the sections read."""
    null = servers.nbdkit("null", "size=64M")
    bench = Bench(str(tmp_path), runs=3, size=64 << 20, quick=True)
    workload = Workload("randwrite-4k-qd1", "randwrite", 4096, 1, 2)
    measured = fio(bench, workload, [("a", null.uri), ("b", null.uri)], 0.2)
    assert set(measured) == {"a", "b"}
    for iops, p99, requests, cpu in measured.values():
        assert iops > 0 and p99 > 0 and requests > 0
        # Two jobs of 0.2 s each, mostly waiting for the server: some CPU, not more
        # than the two jobs' run time.
        assert 0 < cpu <= 0.4 * 1.5


def test_smallio_report_prints_a_result_file_as_markdown():
    from benchlib.smallio import WORKLOADS
    from benchlib.smallio_report import markdown
    g = Group("smallio", WORKLOADS[0].key, WORKLOADS[0].title + ": IOPS", "IOPS")
    g.row("naive", "naive Python plugin", anchor=True)
    g.row("ours", "ours")
    for n, o in ((10000.0, 9000.0), (10000.0, 9500.0), (10000.0, 9200.0)):
        g.add("naive", n, cpu=0.1, data=GIB)
        g.add("ours", o, cpu=0.2, data=GIB)
    text = markdown({"groups": [g.to_json()]})
    assert "| ours | 9.2k (0.92) |" in text
