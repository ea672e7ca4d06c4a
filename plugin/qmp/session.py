"""QMP session rules: what one client may send, and in what order it hears back.

As ``qemu.qmp`` separates its protocol from its client, the control server
is two parts: ``server.py`` owns the sockets (selectors, accept, buffers,
limits) and this module owns one client's QMP session:

- the greeting, and the error a refused connection gets instead of it;
- capabilities negotiation: before ``qmp_capabilities`` only the commands
  registered with ``allow_before_negotiation`` run, and a second
  ``qmp_capabilities`` is refused, as in QEMU;
- one decoded message -> one reply: the envelope checked, the command run
  through the CommandRegistry, the ``id`` echoed, any failure answered
  as ``{"error": {"class", "desc"}}``;
- event delivery: a negotiated session subscribes to the EventBus; events
  queued before a reply leave before it (as in QEMU), and the first events
  leave after the reply to ``qmp_capabilities``.

A session never touches a socket: it writes to a :class:`Channel` that the
socket loop provides.  Everything here runs on the control thread.
"""

from __future__ import annotations

import logging

from ..core.errors import CommandError
from .dispatch import parse_request
from .wire import DecodeError, encode

log = logging.getLogger(__name__)

# Events moved from the subscription per drain (then the output bound is checked again).
_PUMP_BATCH = 64


class Channel:
    """What a session needs from its connection (server.py implements it).

    ``closed``: the connection is gone; ``queue(data)``: append to the output
    buffer; ``flush()``: send what the peer takes now; ``has_room()``: the
    output buffer is below its bound; ``close(reason)``: drop the connection.
    """

    closed: bool

    def queue(self, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def has_room(self) -> bool:
        raise NotImplementedError

    def close(self, reason: str) -> None:
        raise NotImplementedError


def refusal(desc: str) -> bytes:
    """The message a connection that cannot be served gets instead of a greeting."""
    return encode(CommandError(desc).to_reply())


class SessionRules:
    """What every session of one server shares: the commands, the bus, the greeting."""

    def __init__(self, registry, bus, greeting_version=(0, 1, 0),
                 package: str = "overlay-nbd", event_queue: int = 10_000):
        if not registry.allowed_before_negotiation("qmp_capabilities"):
            raise ValueError("registry lacks qmp_capabilities: call register_builtin_commands()")
        self.registry = registry
        self.bus = bus
        self.event_queue = event_queue
        major, minor, micro = greeting_version
        self.greeting = encode({"QMP": {
            "version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                        "package": package},
            "capabilities": [],
        }})

    def open(self, number: int, channel: Channel, notify) -> Session:
        """A session for a new connection; the greeting is queued and flushed.

        ``notify`` is called (from an emitting thread, without arguments)
        when an event is queued for the session: it must wake the socket loop.
        """
        session = Session(self, number, channel, notify)
        channel.queue(self.greeting)
        channel.flush()
        return session


class Session:
    """One client's QMP session: negotiation state, replies, event delivery."""

    def __init__(self, rules: SessionRules, number: int, channel: Channel, notify):
        self.rules = rules
        self.number = number
        self.channel = channel
        self.negotiated = False
        self.subscription = None
        self._notify = notify

    def handle(self, item) -> None:
        """Answer one decoded message (a dict, or a wire.DecodeError)."""
        channel = self.channel
        negotiated = self.negotiated
        if isinstance(item, DecodeError):
            reply = encode(CommandError(item.desc).to_reply())
        else:
            reply = self._dispatch(item)
        if not negotiated and self.negotiated:
            # qmp_capabilities: its reply comes first, then the first events
            # (a start-up backlog, docs/jobs.md), as a QMP client expects.
            channel.queue(reply)
            channel.flush()
            self.pump()
            return
        # Every event queued so far, including those the command emitted,
        # goes out before the reply, as in QEMU.
        self.pump(force=True)
        if not channel.closed:
            channel.queue(reply)
            channel.flush()

    def pump(self, force: bool = False) -> None:
        """Move queued events to the channel's output and send.

        Stops once the output is full unless ``force`` (used before a reply,
        to keep order); the rest waits in the subscription queue.  A
        subscription that overflowed has lost events: the connection is
        dropped (the client reconnects and queries the state again).
        """
        sub = self.subscription
        channel = self.channel
        if sub is None or channel.closed:
            return
        if sub.overflowed:
            channel.close("event-queue-overflow")
            return
        while not channel.closed:
            moved = False
            while force or channel.has_room():
                events = sub.drain(_PUMP_BATCH)
                if not events:
                    break
                for event in events:
                    try:
                        channel.queue(encode(event))
                    except (TypeError, ValueError) as err:
                        log.error("Event not serialisable event=%s error=%s",
                                  event.get("event"), err)
                moved = True
            if not moved:
                return
            channel.flush()
            # Nothing else wakes the loop for the events still queued unless
            # the socket stays full (then it polls for writing): go on while it drains.
            if not channel.has_room():
                return

    def close(self) -> None:
        """The connection is gone: stop receiving events."""
        if self.subscription is not None:
            self.rules.bus.unsubscribe(self.subscription)

    def _dispatch(self, msg: dict) -> bytes:
        """Run one request; returns the encoded reply (with the id echoed)."""
        registry = self.rules.registry
        name = msg.get("execute")
        try:
            name, args, _, _ = parse_request(msg)
            if not self.negotiated:
                if not registry.allowed_before_negotiation(name):
                    raise CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                                       "CommandNotFound")
            elif name == "qmp_capabilities":
                raise CommandError("Capabilities negotiation is already complete, command ignored",
                                   "CommandNotFound")
            reply = {"return": registry.execute(name, args)}
            if name == "qmp_capabilities":
                self._negotiate()
        except CommandError as err:
            reply = err.to_reply()
        except Exception as err:
            log.exception("QMP command failed client=%d command=%s", self.number, name)
            reply = CommandError(str(err) or type(err).__name__).to_reply()
        if "id" in msg:
            reply["id"] = msg["id"]
        try:
            return encode(reply)
        except (TypeError, ValueError) as err:
            log.error("QMP reply not serialisable client=%d command=%s error=%s",
                      self.number, name, err)
            reply = CommandError(f"internal error: reply not serialisable: {err}").to_reply()
            if "id" in msg:
                try:
                    encode(msg["id"])
                    reply["id"] = msg["id"]
                except (TypeError, ValueError):
                    pass
            return encode(reply)

    def _negotiate(self) -> None:
        self.negotiated = True
        self.subscription = self.rules.bus.subscribe(self.rules.event_queue,
                                                     notify=self._notify)
        log.info("QMP client negotiated client=%d", self.number)
