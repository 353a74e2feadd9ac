"""
The topic hub: routing, fan-out, history and flow control.

The hub is the only place that knows who subscribes to what. Subscribers
that follow the same patterns in the same wire format form a L{_Group}; a
message is encoded once per group and the same bytes are written to every
transport in it. Publishes that arrive in one reactor turn are delivered
together at the end of that turn, so each transport gets one write for all
of them.
"""

from __future__ import annotations

import heapq
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ._config import Config
from ._errors import BadRequest, Unavailable
from ._topics import is_wildcard, matcher, validate_topic
from ._wire import envelope, http_chunk, sse_comment, sse_event, ws_text_frame

_DIGITS = re.compile(r"[0-9]{1,30}\Z")

if TYPE_CHECKING:
    from ._subscriber import Subscriber


class Message:
    """One published message and its cached wire encodings."""

    __slots__ = ("topic", "id", "payload", "time", "_wire")

    def __init__(self, topic: str, id: int, payload: bytes, when: float):
        self.topic = topic
        self.id = id
        self.payload = payload
        self.time = when
        self._wire: dict[str, bytes] = {}

    def wire(self, fmt: str) -> bytes:
        """Return this message in wire format C{fmt}, encoding it once."""
        try:
            return self._wire[fmt]
        except KeyError:
            encoded = self._wire[fmt] = _ENCODERS[fmt](self)
            return encoded

    def envelope(self) -> bytes:
        """Return the JSON object that carries this message with its topic."""
        return self.wire("envelope")


_ENCODERS: dict[str, Callable[[Message], bytes]] = {
    "envelope": lambda m: envelope(m.topic, str(m.id), m.payload),
    "sse": lambda m: sse_event(m.payload, str(m.id)),
    "sse-envelope": lambda m: sse_event(m.envelope(), str(m.id)),
    "ws": lambda m: ws_text_frame(m.payload),
    "ws-envelope": lambda m: ws_text_frame(m.envelope()),
}


class Topic:
    """A topic's history and counters."""

    __slots__ = (
        "name",
        "history",
        "history_bytes",
        "evicted_upto",
        "published",
        "last",
        "rate",
        "_counted",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.history: deque[Message] = deque()
        self.history_bytes = 0
        self.evicted_upto = 0
        self.published = 0
        self.last: Message | None = None
        self.rate = 0.0
        self._counted = 0

    def update_rate(self, interval: float) -> None:
        """Fold the messages since the last call into the smoothed rate."""
        recent = (self.published - self._counted) / interval
        self._counted = self.published
        self.rate = 0.7 * self.rate + 0.3 * recent if self.rate else recent


class _Group:
    """
    Subscribers that receive exactly the same bytes: the same patterns, the
    same wire format and the same rate limit.
    """

    def __init__(
        self,
        hub: Hub,
        key: tuple[Any, ...],
        patterns: frozenset[str],
        fmt: str,
        chunked: bool,
        max_rate: float | None,
    ) -> None:
        self.hub = hub
        self.key = key
        self.patterns = patterns
        self.fmt = fmt
        self.chunked = chunked
        self.subscribers: dict[Subscriber, None] = {}
        self._matchers = [matcher(p) for p in patterns if is_wildcard(p)]
        self._interval = 1.0 / max_rate if max_rate else 0.0
        self._next_send: dict[str, float] = {}
        self._waiting: dict[str, Message] = {}
        self._timer: IDelayedCall | None = None

    @property
    def wildcard(self) -> bool:
        return bool(self._matchers)

    def matches(self, topic: str) -> bool:
        """Tell whether a message on C{topic} goes to this group."""
        return topic in self.patterns or any(m(topic) for m in self._matchers)

    def encode(self, messages: list[Message]) -> bytes:
        """Encode C{messages} as one write for this group's transports."""
        fmt = self.fmt
        if len(messages) == 1:
            data = messages[0].wire(fmt)
        else:
            data = b"".join([m.wire(fmt) for m in messages])
        return http_chunk(data) if self.chunked else data

    def frame(self, data: bytes) -> bytes:
        """Wrap bytes that are already in wire format for this group."""
        return http_chunk(data) if self.chunked else data

    def deliver(self, messages: list[Message]) -> None:
        """Send C{messages}, in id order, to every subscriber of the group."""
        if self._interval:
            messages = self._limit_rate(messages)
            if not messages:
                return
        self._write(messages)

    def _write(self, messages: list[Message]) -> None:
        data = self.encode(messages)
        written = 0
        for subscriber in list(self.subscribers):
            if subscriber.paused:
                subscriber.hold(messages)
            else:
                subscriber.write(data)
                written += 1
        hub = self.hub
        hub.delivered += len(messages) * written
        if hub.on_delivery is not None:
            hub.on_delivery(messages, len(self.subscribers))

    # LIMITATION(L-003): a held value is sent after newer ones of other
    # topics, so a rate-limited stream is not in id order.
    def _limit_rate(self, messages: list[Message]) -> list[Message]:
        now = self.hub.clock.seconds()
        ready = []
        for message in messages:
            topic = message.topic
            if now >= self._next_send.get(topic, 0.0) and topic not in self._waiting:
                self._next_send[topic] = now + self._interval
                ready.append(message)
            else:
                if topic in self._waiting:
                    self.hub.skipped += len(self.subscribers)
                self._waiting[topic] = message
        if self._waiting and self._timer is None:
            self._schedule(now)
        return ready

    def _schedule(self, now: float) -> None:
        due = min(self._next_send.get(t, now) for t in self._waiting)
        self._timer = self.hub.clock.callLater(max(0.0, due - now), self._release)

    def _release(self) -> None:
        self._timer = None
        now = self.hub.clock.seconds()
        ready = [
            message
            for topic, message in self._waiting.items()
            if self._next_send.get(topic, 0.0) <= now
        ]
        for message in ready:
            del self._waiting[message.topic]
            self._next_send[message.topic] = now + self._interval
        if self._waiting:
            self._schedule(now)
        if ready:
            ready.sort(key=lambda m: m.id)
            self._write(ready)

    def close(self) -> None:
        """Forget pending rate-limited messages."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._waiting.clear()


class Hub:
    """
    Routes published messages to subscribers, keeps history, and applies
    the slow-consumer policy.
    """

    # LIMITATION(L-008): one process; history lives in this process only.

    log = Logger()

    def __init__(self, clock: IReactorTime, config: Config | None = None) -> None:
        self.clock = clock
        self.config = config or Config()
        self.topics: dict[str, Topic] = {}
        self.subscribers: set[Subscriber] = set()
        self.paused: dict[Subscriber, float] = {}
        self.closing = False

        self.started = time.time()
        self.first_id = int(self.started * 1_000_000)
        self.last_id = self.first_id
        self.forgotten_upto = 0

        self.published = 0
        self.delivered = 0
        self.skipped = 0
        self.dropped = 0

        # Called after each group write with the messages and the number
        # of subscribers written to; the metrics module listens here.
        self.on_delivery: Callable[[list[Message], int], None] | None = None

        self._groups: dict[tuple[Any, ...], _Group] = {}
        self._exact: dict[str, set[_Group]] = {}
        self._wild: set[_Group] = set()
        self._wild_routes: dict[str, list[_Group]] = {}
        self._batch: list[Message] = []
        self._flush_call: IDelayedCall | None = None

        self._forgot_at = float("-inf")
        self._history_bytes = 0
        self._oldest: list[tuple[int, str]] = []

        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock

    # Life cycle

    def start(self) -> None:
        """Start the hub's periodic work: sweeps, rates and heartbeats."""
        self._ticker.start(1.0, now=False)
        if self.config.heartbeat > 0:
            self._heartbeat.start(self.config.heartbeat, now=False)

    def stop(self) -> None:
        """Stop the periodic work and end every subscriber's stream."""
        self.closing = True
        for call in (self._ticker, self._heartbeat):
            if call.running:
                call.stop()
        self.flush()
        for subscriber in list(self.subscribers):
            try:
                subscriber.shutdown()
            except Exception:
                # One stream that cannot end must not keep others open.
                self.log.failure("Cannot end a stream at shutdown")
        for group in self._groups.values():
            group.close()

    # Publishing

    def publish(self, topic_name: str, payload: bytes) -> Message:
        """
        Publish C{payload} to a topic; it reaches subscribers at the end of
        this reactor turn.
        """
        validate_topic(topic_name)
        topic = self.topics.get(topic_name)
        if topic is None:
            topic = self._create_topic(topic_name)

        now = self.clock.seconds()
        self.last_id += 1
        message = Message(topic_name, self.last_id, payload, now)
        self._record(topic, message)
        self.published += 1

        self._batch.append(message)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)
        return message

    def flush(self) -> None:
        """Deliver every message published since the last flush."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        if len(batch) == 1:
            # A delivery can drop a group (a slow subscriber cut off).
            for group in tuple(self._route(batch[0].topic)):
                self._deliver(group, batch)
            return
        per_group: dict[_Group, list[Message]] = {}
        for message in batch:
            for group in tuple(self._route(message.topic)):
                per_group.setdefault(group, []).append(message)
        for group, messages in per_group.items():
            self._deliver(group, messages)

    def _deliver(self, group: _Group, messages: list[Message]) -> None:
        # A fault in one group must not cost the other groups their turn.
        try:
            group.deliver(messages)
        except Exception:
            self.log.failure("Cannot deliver to {patterns}", patterns=group.patterns)

    def _create_topic(self, name: str) -> Topic:
        if len(self.topics) >= self.config.max_topics:
            # Looking for idle topics costs a pass over all of them: at most
            # once a second, so a flood of new topics gets cheap 503s.
            now = self.clock.seconds()
            if now - self._forgot_at >= 1.0:
                self._forgot_at = now
                self._forget_idle_topics()
            if len(self.topics) >= self.config.max_topics:
                raise Unavailable(
                    f"The server holds its limit of {self.config.max_topics} topics."
                )
        topic = self.topics[name] = Topic(name)
        return topic

    def _route(self, topic: str) -> Iterable[_Group]:
        exact = self._exact.get(topic)
        if not self._wild:
            return exact or ()
        wild = self._wild_routes.get(topic)
        if wild is None:
            wild = self._wild_routes[topic] = [
                g for g in self._wild if g.matches(topic)
            ]
            if len(self._wild_routes) > 4 * self.config.max_topics:
                self._wild_routes.clear()
        if not exact:
            return wild
        return exact.union(wild)

    # History

    def _record(self, topic: Topic, message: Message) -> None:
        topic.published += 1
        topic.last = message
        config = self.config
        if config.history_size == 0 or config.history_bytes == 0:
            topic.evicted_upto = message.id
            return

        if not topic.history:
            heapq.heappush(self._oldest, (message.id, topic.name))
        topic.history.append(message)
        size = len(message.payload)
        topic.history_bytes += size
        self._history_bytes += size

        while len(topic.history) > config.history_size:
            self._evict(topic)
        while self._history_bytes > config.history_bytes:
            self._evict_oldest()

    def _evict(self, topic: Topic) -> None:
        message = topic.history.popleft()
        size = len(message.payload)
        topic.history_bytes -= size
        self._history_bytes -= size
        topic.evicted_upto = message.id
        if topic.history:
            heapq.heappush(self._oldest, (topic.history[0].id, topic.name))

    def _evict_oldest(self) -> None:
        while self._oldest:
            head_id, name = heapq.heappop(self._oldest)
            topic = self.topics.get(name)
            if topic is not None and topic.history and topic.history[0].id == head_id:
                self._evict(topic)
                return

    def _expire(self, now: float) -> None:
        cutoff = now - self.config.history_ttl
        for topic in self.topics.values():
            while topic.history and topic.history[0].time < cutoff:
                self._evict(topic)
        if len(self._oldest) > 2 * len(self.topics) + 64:
            self._oldest = [
                (t.history[0].id, t.name) for t in self.topics.values() if t.history
            ]
            heapq.heapify(self._oldest)

    def _forget_idle_topics(self) -> None:
        followed = self._followed_topics()
        for name, topic in list(self.topics.items()):
            if not topic.history and name not in followed:
                self.forgotten_upto = max(self.forgotten_upto, topic.evicted_upto)
                del self.topics[name]
                self._wild_routes.pop(name, None)

    def _followed_topics(self) -> set[str]:
        followed = set(self._exact)
        for name in self.topics:
            if any(group.matches(name) for group in self._wild):
                followed.add(name)
        return followed

    def matching_topics(self, patterns: Iterable[str]) -> list[Topic]:
        """Return the known topics that match any of C{patterns}."""
        exact = [p for p in patterns if not is_wildcard(p)]
        wild = [matcher(p) for p in patterns if is_wildcard(p)]
        found = {name: self.topics[name] for name in exact if name in self.topics}
        if wild:
            for name, topic in self.topics.items():
                if any(match(name) for match in wild):
                    found[name] = topic
        return list(found.values())

    def replay(
        self, patterns: Iterable[str], last: int = 0, since: str | None = None
    ) -> tuple[list[Message], bool]:
        """
        Return the history a new subscription should receive first, in id
        order, and whether the client must be told to reset its state.

        With C{since}, that is every kept message after that id; if messages
        after it were already dropped, or the id is not one of this server
        run's, the client is told to reset and gets the C{last} messages of
        each topic instead. Without C{since}, it is the C{last} messages of
        each topic.
        """
        self._expire(self.clock.seconds())
        topics = self.matching_topics(patterns)
        if since is not None:
            try:
                after = parse_id(since)
            except BadRequest:
                after = -1
            if self._can_resume(after, topics):
                found = [m for t in topics for m in t.history if m.id > after]
                found.sort(key=lambda m: m.id)
                return found, False
            reset = True
        else:
            reset = False
        if last <= 0:
            return [], reset
        found = [m for t in topics for m in list(t.history)[-last:]]
        found.sort(key=lambda m: m.id)
        return found, reset

    def _can_resume(self, after: int, topics: list[Topic]) -> bool:
        if not self.first_id <= after <= self.last_id:
            return False
        if after < self.forgotten_upto:
            return False
        return all(topic.evicted_upto <= after for topic in topics)

    def has_gap(self, topic_name: str, since: str) -> bool:
        """
        Tell whether messages of a topic after the id C{since} are no
        longer kept, so that its history cannot fill a client's gap.
        """
        topic = self.topics.get(topic_name)
        return not self._can_resume(parse_id(since), [topic] if topic else [])

    def messages(
        self, topic_name: str, since: str | None = None, limit: int = 100
    ) -> list[Message]:
        """Return up to C{limit} kept messages of a topic after C{since}."""
        self._expire(self.clock.seconds())
        topic = self.topics.get(topic_name)
        if topic is None or limit <= 0:
            return []
        after = parse_id(since) if since is not None else 0
        found = [m for m in topic.history if m.id > after]
        return found[:limit] if since is not None else found[-limit:]

    # Subscriptions

    def attach(
        self,
        subscriber: Subscriber,
        patterns: Iterable[str],
        last: int = 0,
        since: str | None = None,
    ) -> None:
        """
        Subscribe C{subscriber} to C{patterns}, after replaying history.

        Pending publishes are flushed first, so that a message is never both
        replayed and delivered live.
        """
        new = frozenset(patterns) - subscriber.patterns
        self.flush()
        replayed, reset = self.replay(new, last, since)
        if subscriber.max_rate and replayed:
            # A rate-limited subscriber wants current values, not a burst:
            # the newest replayed message of each topic, in id order.
            newest = {m.topic: m for m in replayed}
            self.skipped += len(replayed) - len(newest)
            replayed = sorted(newest.values(), key=lambda m: m.id)
        self.subscribers.add(subscriber)
        self._join(subscriber, subscriber.patterns | new)
        if reset:
            subscriber.reset(self.last_id)
        if replayed:
            subscriber.send(replayed)

    def detach(self, subscriber: Subscriber, patterns: Iterable[str] = ()) -> None:
        """
        Unsubscribe C{subscriber} from C{patterns}, or from everything if
        none are given.
        """
        remaining = (
            subscriber.patterns - frozenset(patterns) if patterns else frozenset()
        )
        self._join(subscriber, remaining)
        if not remaining:
            self.subscribers.discard(subscriber)
            self.paused.pop(subscriber, None)

    def _join(self, subscriber: Subscriber, patterns: frozenset[str]) -> None:
        old = subscriber.group
        key = (subscriber.fmt, subscriber.chunked, patterns, subscriber.max_rate)
        if old is not None and old.key == key:
            return
        if old is not None:
            del old.subscribers[subscriber]
            if not old.subscribers:
                self._drop_group(old)
        subscriber.patterns = patterns
        subscriber.group = None
        if not patterns:
            return
        group = self._groups.get(key)
        if group is None:
            group = self._add_group(key, patterns, subscriber)
        group.subscribers[subscriber] = None
        subscriber.group = group

    def _add_group(
        self, key: tuple[Any, ...], patterns: frozenset[str], subscriber: Subscriber
    ) -> _Group:
        group = _Group(
            self, key, patterns, subscriber.fmt, subscriber.chunked, subscriber.max_rate
        )
        self._groups[key] = group
        for pattern in patterns:
            if not is_wildcard(pattern):
                self._exact.setdefault(pattern, set()).add(group)
        if group.wildcard:
            self._wild.add(group)
            self._wild_routes.clear()
        return group

    def _drop_group(self, group: _Group) -> None:
        group.close()
        del self._groups[group.key]
        for pattern in group.patterns:
            groups = self._exact.get(pattern)
            if groups is not None:
                groups.discard(group)
                if not groups:
                    del self._exact[pattern]
        if group.wildcard:
            self._wild.discard(group)
            self._wild_routes.clear()

    def subscriber_count(self, topic: str) -> int:
        """Count the connections that receive messages on C{topic}."""
        return sum(len(group.subscribers) for group in self._route(topic))

    # Flow control

    def paused_subscriber(self, subscriber: Subscriber) -> None:
        """Note that C{subscriber}'s transport asked it to pause."""
        self.paused.setdefault(subscriber, self.clock.seconds())

    def resumed_subscriber(self, subscriber: Subscriber) -> None:
        """Note that C{subscriber}'s transport can take data again."""
        self.paused.pop(subscriber, None)

    # Periodic work

    def _tick(self) -> None:
        now = self.clock.seconds()
        limit = self.config.stall_timeout
        if limit > 0:
            for subscriber, since in list(self.paused.items()):
                if now - since > limit:
                    self.dropped += 1
                    self.paused.pop(subscriber, None)
                    subscriber.abort("stalled")
        self._expire(now)
        for topic in self.topics.values():
            topic.update_rate(1.0)
        if (
            len(self.topics) > self.config.max_topics // 2
            and now - self._forgot_at >= 60
        ):
            self._forgot_at = now
            self._forget_idle_topics()

    def _beat(self) -> None:
        comment = sse_comment()
        for group in list(self._groups.values()):
            if not group.fmt.startswith("sse"):
                continue
            data = group.frame(comment)
            for subscriber in list(group.subscribers):
                if not subscriber.paused:
                    subscriber.write(data)

    def stats(self) -> dict[str, object]:
        """Return the hub's counters."""
        return {
            "topics": len(self.topics),
            "connections": len(self.subscribers),
            "published": self.published,
            "delivered": self.delivered,
            "skipped": self.skipped,
            "dropped": self.dropped,
            "paused": len(self.paused),
            "history_bytes": self._history_bytes,
        }


def parse_id(text: str) -> int:
    """Parse a message id sent by a client, or raise L{BadRequest}."""
    text = text.strip()
    if not _DIGITS.match(text):
        raise BadRequest("A message id is a string of digits.")
    return int(text)
