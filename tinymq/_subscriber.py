"""
A subscriber: one client connection, seen by the hub as a push producer.

Its transport pauses it when the client reads slower than messages arrive.
While paused, the hub hands it messages instead of bytes, and it holds them
in a bounded backlog; what happens when that backlog is full is the
slow-consumer policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from ._errors import BadRequest, Forbidden

if TYPE_CHECKING:
    from ._config import Config
    from ._hub import Hub, Message, _Group


# The most history messages per topic a client may ask for with 'last'.
MAX_LAST = 1000


def parse_count(value: object, name: str, default: int, top: int) -> int:
    """
    Read a whole number, 0 or more, that a client chose (as query text or
    as a JSON integer), capped at C{top}, or raise L{BadRequest}.
    """
    if value is None:
        return default
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return min(int(value), top)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return min(value, top)
    raise BadRequest(f"'{name}' must be a whole number, 0 or more.")


def client_options(
    config: Config, policy: object, max_rate: object
) -> tuple[str | None, float | None]:
    """
    Check a subscriber's own choice of slow-consumer policy and rate,
    given as query text or as JSON values, or raise L{BadRequest}.
    """
    if policy is None and max_rate is None:
        return None, None
    if not config.client_policy:
        raise Forbidden("This server does not let clients choose a policy.")
    if policy is not None and policy not in ("disconnect", "latest"):
        raise BadRequest("'policy' is 'disconnect' or 'latest'.")
    rate = None
    if max_rate is not None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, (str, int, float)):
            raise BadRequest("'max_rate' must be a number.")
        try:
            rate = float(max_rate)
        except ValueError:
            raise BadRequest("'max_rate' must be a number.") from None
        if not 0 < rate <= 1000:
            raise BadRequest("'max_rate' is between 0 and 1000.")
    return policy, rate  # type: ignore[return-value]


@implementer(IPushProducer)
class Subscriber:
    """
    The hub's side of one connection. Protocol modules subclass it and
    provide the writes and the ways to end the connection.
    """

    fmt = "sse"
    chunked = False

    def __init__(
        self,
        hub: Hub,
        write: Callable[[bytes], object],
        policy: str | None = None,
        max_rate: float | None = None,
    ) -> None:
        self.hub = hub
        self.write = write
        self.policy = policy or hub.config.slow_policy
        self.max_rate = max_rate
        self.patterns: frozenset[str] = frozenset()
        self.group: _Group | None = None
        self.paused = False
        self.closed = False
        self.skipped = 0
        self._held: list[Message] = []
        self._latest: dict[str, Message] = {}
        self._held_bytes = 0

    # IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        """Stop writing: the transport's buffer is full."""
        if not self.paused and not self.closed:
            self.paused = True
            self.hub.paused_subscriber(self)

    def resumeProducing(self) -> None:
        """Write what was held, in order, then go on writing live."""
        if self.closed:
            return
        self.paused = False
        self.hub.resumed_subscriber(self)
        self._drain()

    def stopProducing(self) -> None:
        """The connection is going away: leave the hub."""
        self.gone()

    # Called by the hub

    def send(self, messages: list[Message]) -> None:
        """Send C{messages} to this subscriber alone, or hold them."""
        self.hub.delivered += len(messages)
        if self.paused:
            self.hold(messages)
        elif self.group is not None:
            self.write(self.group.encode(messages))

    def hold(self, messages: list[Message]) -> None:
        """Keep C{messages} until the transport resumes, within the limits."""
        if self.closed:
            return
        if self.policy == "latest":
            for message in messages:
                previous = self._latest.pop(message.topic, None)
                if previous is not None:
                    self.skipped += 1
                    self.hub.skipped += 1
                self._latest[message.topic] = message
            if len(self._latest) > self.hub.config.backlog_messages:
                self._overflowed()
            return

        self._held.extend(messages)
        self._held_bytes += sum(len(m.payload) for m in messages)
        config = self.hub.config
        if (
            len(self._held) > config.backlog_messages
            or self._held_bytes > config.backlog_bytes
        ):
            self._overflowed()

    def _overflowed(self) -> None:
        self._held = []
        self._latest = {}
        self._held_bytes = 0
        self.hub.dropped += 1
        self.hub.paused.pop(self, None)
        self.overflow()

    def _drain(self) -> None:
        if self.skipped:
            skipped, self.skipped = self.skipped, 0
            self.notify_skipped(skipped)
        held = self._held or sorted(self._latest.values(), key=lambda m: m.id)
        self._held = []
        self._latest = {}
        self._held_bytes = 0
        if held and self.group is not None:
            self.hub.delivered += len(held)
            self.write(self.group.encode(held))

    @property
    def held_bytes(self) -> int:
        """Bytes of payload held for this subscriber while it is paused."""
        if self._latest:
            return sum(len(m.payload) for m in self._latest.values())
        return self._held_bytes

    def gone(self) -> None:
        """Forget this subscriber: its connection is closed."""
        if self.closed:
            return
        self.closed = True
        self._held = []
        self._latest = {}
        self.hub.detach(self)

    # Provided by each protocol

    def reset(self, last_id: int) -> None:
        """Tell the client that history cannot fill its gap."""

    def notify_skipped(self, count: int) -> None:
        """Tell the client that C{count} messages were conflated away."""

    def overflow(self) -> None:
        """The backlog is full and the policy is to disconnect."""
        self.abort("backlog-full")

    def abort(self, reason: str) -> None:
        """End the connection now, without waiting for buffered data."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """End the connection cleanly because the server stops."""
        raise NotImplementedError
