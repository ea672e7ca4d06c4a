"""Event bus: job code emits QMP events, subscribers (QMP clients) receive them.

``EventBus.emit()`` is called from job threads and from command handlers.
It must never block on a slow consumer, so every subscriber has a bounded
queue and delivery is a non-blocking append under short locks.  All
subscribers see events in one global order (the order emit() was called).

Overflow policy: when a subscriber's queue is full, the new event is NOT
queued for that subscriber and its ``overflowed`` flag is set; the queued
events stay in order, the stream just ends with a gap.  A subscriber that
overflowed has lost events, so its consumer should drop it: the control
server disconnects such a client (with a log line) and the client may
reconnect and re-query state.  Events for the other subscribers keep
flowing unaffected.
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time

log = logging.getLogger(__name__)


class Subscription:
    """A bounded, ordered queue of events for one consumer."""

    def __init__(self, maxlen: int = 1000, notify=None):
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.maxlen = maxlen
        # Called (without arguments, from the emitting thread) after each
        # delivery; must not block.  Lets a select() loop wake up.
        self._notify = notify
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self.overflowed = False
        self.closed = False

    def _deliver(self, event: dict) -> None:
        with self._cond:
            if self.closed:
                return
            if len(self._queue) >= self.maxlen:
                self.overflowed = True
            else:
                self._queue.append(event)
                self._cond.notify()
        if self._notify is not None:
            self._notify()

    def get(self, timeout=None) -> dict | None:
        """The next event, or None on timeout or once unsubscribed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self.closed:
                    return None
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)
            return self._queue.popleft()

    def drain(self, limit: int | None = None) -> list[dict]:
        """Queued events (at most ``limit``), oldest first, without waiting."""
        with self._cond:
            if limit is None or limit >= len(self._queue):
                events = list(self._queue)
                self._queue.clear()
            else:
                events = [self._queue.popleft() for _ in range(limit)]
            return events

    def pending(self) -> int:
        """Number of queued events."""
        with self._cond:
            return len(self._queue)

    def _close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class EventBus:
    """Fan-out of QMP events to any number of subscribers.

    Start-up backlog: after ``keep_backlog()`` (the service calls it when it
    restores saved jobs, before the control socket accepts clients) the
    events are also kept, up to BACKLOG_MAX, until the first subscriber
    comes; every subscriber then receives that backlog first, with the
    original timestamps, so whoever connects after a restart sees what the
    recovery did (JOB_RECOVERED, JOB_STATUS_CHANGE created, running...).
    """

    BACKLOG_MAX = 1000

    def __init__(self):
        self._lock = threading.Lock()
        self._subscribers: list[Subscription] = []
        self._backlog: list | None = None
        self._backlog_open = False

    def keep_backlog(self) -> None:
        with self._lock:
            self._backlog = []
            self._backlog_open = True

    def emit(self, name: str, data: dict | None = None) -> None:
        """Thread-safe, never blocks on a slow reader.

        Stamps {"seconds", "microseconds"} (wall clock, as QEMU) and
        delivers {"event": name, "data": data, "timestamp": ...} to every
        subscriber in emit order.  ``data`` is copied, so the caller may
        keep mutating its dict.
        """
        now_us = time.time_ns() // 1000
        event = {
            "event": name,
            "data": {} if data is None else copy.deepcopy(data),
            "timestamp": {"seconds": now_us // 1_000_000,
                          "microseconds": now_us % 1_000_000},
        }
        # Holding the bus lock across the fan-out gives every subscriber
        # the same order; each delivery is a bounded, non-blocking append.
        with self._lock:
            if self._backlog_open and len(self._backlog) < self.BACKLOG_MAX:
                self._backlog.append(event)
            for sub in self._subscribers:
                was_overflowed = sub.overflowed
                sub._deliver(event)
                if sub.overflowed and not was_overflowed:
                    log.warning("Event queue overflow maxlen=%d event=%s", sub.maxlen, name)

    def subscribe(self, maxlen: int = 1000, notify=None) -> Subscription:
        """A new subscription receiving every event emitted from now on.

        ``notify`` (optional) is called after each delivery from the
        emitting thread; it must be quick and must not block.
        """
        sub = Subscription(maxlen, notify)
        with self._lock:
            if self._backlog:
                self._backlog_open = False
                for event in self._backlog:
                    sub._deliver(event)
            self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub) -> None:
        """Stop delivering to ``sub``; a waiting get() returns None.  Idempotent."""
        with self._lock:
            try:
                self._subscribers.remove(sub)
            except ValueError:
                pass
        sub._close()
