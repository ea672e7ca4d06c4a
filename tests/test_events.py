"""EventBus and Subscription: order, shape, bounded queues, never blocking."""

import threading
import time

import pytest

from plugin.qmp.events import EventBus


def test_event_has_qmp_shape():
    bus = EventBus()
    sub = bus.subscribe()
    bus.emit("BLOCK_JOB_READY", {"device": "d"})
    event = sub.get(timeout=1)
    assert (event["event"], event["data"], sorted(event["timestamp"])) == \
        ("BLOCK_JOB_READY", {"device": "d"}, ["microseconds", "seconds"])


def test_timestamp_is_wall_clock():
    bus = EventBus()
    sub = bus.subscribe()
    before = time.time()
    bus.emit("X")
    ts = sub.get(timeout=1)["timestamp"]
    assert before - 1 <= ts["seconds"] + ts["microseconds"] / 1e6 <= time.time() + 1


def test_missing_data_becomes_empty_object():
    bus = EventBus()
    sub = bus.subscribe()
    bus.emit("STOP")
    assert sub.get(timeout=1)["data"] == {}


def test_data_is_copied_at_emit_time():
    bus = EventBus()
    sub = bus.subscribe()
    data = {"status": "running"}
    bus.emit("JOB_STATUS_CHANGE", data)
    data["status"] = "paused"
    assert sub.get(timeout=1)["data"] == {"status": "running"}


def test_events_arrive_in_emit_order():
    bus = EventBus()
    sub = bus.subscribe()
    for i in range(100):
        bus.emit("E", {"i": i})
    assert [sub.get(timeout=1)["data"]["i"] for _ in range(100)] == list(range(100))


def test_every_subscriber_sees_the_same_order_under_concurrent_emits():
    bus = EventBus()
    subs = [bus.subscribe(maxlen=10_000) for _ in range(3)]

    def emitter(tag):
        for i in range(500):
            bus.emit("E", {"tag": tag, "i": i})

    threads = [threading.Thread(target=emitter, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    orders = [[(e["data"]["tag"], e["data"]["i"]) for e in sub.drain()] for sub in subs]
    assert len(orders[0]) == 2000 and orders[0] == orders[1] == orders[2]


def test_subscriber_gets_only_events_after_subscribing():
    bus = EventBus()
    bus.emit("EARLY")
    sub = bus.subscribe()
    bus.emit("LATE")
    assert [e["event"] for e in sub.drain()] == ["LATE"]


def test_get_times_out_with_none():
    sub = EventBus().subscribe()
    assert sub.get(timeout=0.05) is None


def test_get_waits_for_an_event_from_another_thread():
    bus = EventBus()
    sub = bus.subscribe()
    timer = threading.Timer(0.05, bus.emit, args=("LATER",))
    timer.start()
    event = sub.get(timeout=5)
    timer.join()
    assert event["event"] == "LATER"


def test_overflow_keeps_oldest_events_and_sets_flag():
    bus = EventBus()
    sub = bus.subscribe(maxlen=3)
    for i in range(5):
        bus.emit("E", {"i": i})
    assert (sub.overflowed, [e["data"]["i"] for e in sub.drain()]) == (True, [0, 1, 2])


def test_overflow_of_one_subscriber_does_not_affect_another():
    bus = EventBus()
    small = bus.subscribe(maxlen=2)
    big = bus.subscribe(maxlen=100)
    for i in range(10):
        bus.emit("E", {"i": i})
    assert (small.overflowed, big.overflowed, len(big.drain())) == (True, False, 10)


def test_emit_does_not_block_on_a_subscriber_that_never_reads():
    bus = EventBus()
    bus.subscribe(maxlen=10)
    start = time.monotonic()
    for i in range(20_000):
        bus.emit("E", {"i": i})
    assert time.monotonic() - start < 5


def test_unsubscribed_subscription_receives_nothing():
    bus = EventBus()
    sub = bus.subscribe()
    bus.unsubscribe(sub)
    bus.emit("E")
    assert sub.get(timeout=0.01) is None


def test_unsubscribe_wakes_a_waiting_get():
    bus = EventBus()
    sub = bus.subscribe()
    result = []
    waiter = threading.Thread(target=lambda: result.append(sub.get()))
    waiter.start()
    time.sleep(0.05)
    bus.unsubscribe(sub)
    waiter.join(5)
    assert result == [None]


def test_unsubscribe_is_idempotent():
    bus = EventBus()
    sub = bus.subscribe()
    bus.unsubscribe(sub)
    bus.unsubscribe(sub)
    assert sub.closed


def test_notify_callback_runs_after_each_delivery():
    bus = EventBus()
    seen = []
    sub = bus.subscribe(notify=lambda: seen.append(len(sub.drain())))
    bus.emit("A")
    bus.emit("B")
    assert seen == [1, 1]


def test_maxlen_must_be_positive():
    with pytest.raises(ValueError):
        EventBus().subscribe(maxlen=0)
