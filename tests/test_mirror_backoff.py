"""RetrySchedule (plugin/backoff.py): when a mirror retries copies that failed under ignore."""

import pytest

from plugin.blockcopy.backoff import RetrySchedule

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def schedule(clock):
    return RetrySchedule(MiB, first=0.05, maximum=5.0, clock=clock)


def test_a_failed_range_waits_the_first_delay_then_comes_back(schedule, clock):
    assert schedule.defer(0, MiB) == 0.05
    assert schedule.due() == [] and schedule.waiting_bytes == MiB
    clock.now += 0.05
    assert schedule.due() == [(0, MiB)]
    assert not schedule and schedule.waiting_bytes == 0


def test_each_new_failure_of_a_range_doubles_its_delay_up_to_the_maximum(schedule):
    delays = [schedule.defer(3 * MiB, MiB) for _ in range(10)]
    assert delays[:5] == [0.05, 0.1, 0.2, 0.4, 0.8]
    assert max(delays) == 5.0 and delays[-1] == 5.0


def test_a_range_split_or_merged_on_retry_keeps_its_history(schedule):
    schedule.defer(2 * MiB, MiB)
    schedule.defer(2 * MiB, MiB)                       # 0.1
    assert schedule.defer(2 * MiB + 65536, 65536) == 0.2
    assert schedule.defer(MiB + 65536, MiB) == 0.4     # straddles the bad chunk


def test_success_forgets_a_range_failures(schedule):
    for _ in range(4):
        schedule.defer(0, MiB)
    schedule.succeeded(0, MiB)
    assert schedule.defer(0, MiB) == 0.05


def test_other_ranges_are_not_delayed_by_one_bad_range(schedule):
    for _ in range(6):
        schedule.defer(5 * MiB, MiB)
    assert schedule.defer(0, MiB) == 0.05


def test_ranges_come_back_in_due_order(schedule, clock):
    for _ in range(3):
        schedule.defer(MiB, MiB)                       # due in 0.2
    schedule.defer(0, MiB)                             # due in 0.05
    assert schedule.next_due() == pytest.approx(100.05)
    clock.now += 1
    assert schedule.due() == [(0, MiB), (MiB, MiB), (MiB, MiB), (MiB, MiB)]


def test_drain_returns_every_waiting_range_at_once(schedule):
    schedule.defer(0, MiB)
    schedule.defer(4 * MiB, 4096)
    assert sorted(schedule.drain()) == [(0, MiB), (4 * MiB, 4096)]
    assert not schedule and schedule.next_due() is None


def test_gate_doubles_while_nothing_succeeds(schedule, clock):
    assert [schedule.failed_batch() for _ in range(4)] == [0.05, 0.1, 0.2, 0.4]
    assert not schedule.gate_open()
    clock.now += 0.4
    assert schedule.gate_open()
    for _ in range(10):
        schedule.failed_batch()
    assert schedule.failed_batch() == 5.0


def test_gate_falls_back_to_the_first_delay_after_a_success(schedule):
    for _ in range(5):
        schedule.failed_batch()
    schedule.succeeded(7 * MiB, MiB)
    assert schedule.failed_batch() == 0.05


def test_gate_is_open_before_any_failure(schedule):
    assert schedule.gate_open()
