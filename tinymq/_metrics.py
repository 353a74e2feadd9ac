"""
Prometheus metrics, read from the hub when Prometheus scrapes.

The hub already counts what it does; a custom collector turns its counters
into metric families at scrape time, so the fan-out path pays nothing for
them. The one figure the hub does not keep, the time from publish to
write, is measured by the hub's delivery hook, once per group write, into
a plain list of bucket counts.

Each server has a registry of its own, never prometheus_client's global
one, so that two servers in one process (as in tests) keep apart.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import __version__
from ._hub import Hub, Message, Topic

OTHER = "_other"
"""The C{topic} label of the series that sums every topic without its own."""

IDLE_RATE = 0.01
"""A topic whose smoothed rate is below this, in messages a second, is idle."""

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def connection_counts(hub: Hub) -> tuple[dict[str, int], int]:
    """
    Count the hub's subscribers by protocol (C{sse}, C{ws}) and their
    subscriptions (topics and patterns followed).
    """
    counts = {"sse": 0, "ws": 0}
    subscriptions = 0
    for subscriber in hub.subscribers:
        protocol = "sse" if subscriber.fmt.startswith("sse") else "ws"
        counts[protocol] += 1
        subscriptions += len(subscriber.patterns)
    return counts, subscriptions


def backlog_bytes(hub: Hub) -> int:
    """Return the bytes of payload held for paused subscribers."""
    return sum(subscriber.held_bytes for subscriber in hub.paused)


def history_messages(hub: Hub) -> int:
    """Return the number of messages kept in history, over all topics."""
    return sum(len(topic.history) for topic in hub.topics.values())


def _activity(topic: Topic, subscribers: int) -> tuple[float, int, int]:
    return (topic.rate, subscribers, topic.published)


def rank_topics(hub: Hub, limit: int) -> list[tuple[Topic, int]]:
    """
    Return up to C{limit} topics with their subscriber counts, the most
    active first: by message rate, then subscribers, then messages.
    """
    counted = [(t, hub.subscriber_count(t.name)) for t in hub.topics.values()]
    counted.sort(key=lambda pair: (_activity(*pair), pair[0].name), reverse=True)
    return counted[:limit]


class LatencyHistogram:
    """Bucket counts of the time from publish to write, in seconds."""

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Return the buckets as Prometheus shows them: C{le} and a count."""
        buckets = []
        total = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append((repr(float(bound)), float(total)))
        buckets.append(("+Inf", float(total + self.counts[-1])))
        return buckets


def _idle(topic: Topic, subscribers: int) -> bool:
    return topic.rate < IDLE_RATE and not subscribers


class TopicSeries:
    """
    Chooses the topics that get series of their own, and keeps every
    per-topic counter monotonic while that choice changes.

    Up to C{limit} topics are chosen, the most active first. A chosen topic
    keeps its series while it exists, unless it falls idle (a rate under
    L{IDLE_RATE}, no subscribers) and a busier topic waits for a place.

    C{_other} counts every message not counted in a topic's own series, so
    the series always add up to the server's total. A topic that gets its
    series after its messages were shown under C{_other} leaves enough of
    them there that C{_other} does not go down.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # name -> (the topic, its messages counted under _other before)
        self.chosen: dict[str, tuple[Topic, int]] = {}
        self.other_published = 0

    def collect(self, hub: Hub) -> tuple[list[tuple[str, int, int]], tuple[int, int]]:
        """
        Return C{(name, published, subscribers)} for each chosen topic and
        C{(published, subscribers)} for the rest.
        """
        counted = rank_topics(hub, len(hub.topics))
        subscribers = {topic.name: count for topic, count in counted}
        self._forget_gone(hub)
        waiting = [
            (topic, count)
            for topic, count in counted
            if topic.name not in self.chosen and topic.name != OTHER
        ]
        # Busy topics first, so that no idle topic takes a place that a
        # busy one then needs.
        waiting.sort(key=lambda pair: _idle(*pair))
        new = self._choose(waiting, subscribers)

        own = sum(t.published - offset for t, offset in self.chosen.values())
        other = hub.published - own
        deficit = self.other_published - other
        for topic in new:
            if deficit <= 0:
                break
            # Messages already shown under _other stay there.
            offset = min(deficit, topic.published)
            self.chosen[topic.name] = (topic, offset)
            deficit -= offset
            other += offset
        self.other_published = other

        series = [
            (name, topic.published - offset, subscribers[name])
            for name, (topic, offset) in sorted(self.chosen.items())
        ]
        other_subscribers = sum(
            count for name, count in subscribers.items() if name not in self.chosen
        )
        return series, (other, other_subscribers)

    def _forget_gone(self, hub: Hub) -> None:
        for name, (topic, _) in list(self.chosen.items()):
            if hub.topics.get(name) is not topic:
                del self.chosen[name]

    def _choose(
        self, waiting: list[tuple[Topic, int]], subscribers: dict[str, int]
    ) -> list[Topic]:
        new = []
        for topic, count in waiting:
            if len(self.chosen) >= self.limit:
                if _idle(topic, count):
                    break
                idle = self._idlest(subscribers)
                if idle is None:
                    break
                del self.chosen[idle]
            self.chosen[topic.name] = (topic, 0)
            new.append(topic)
        return new

    def _idlest(self, subscribers: dict[str, int]) -> str | None:
        idle = [
            (topic.published, name)
            for name, (topic, _) in self.chosen.items()
            if _idle(topic, subscribers[name])
        ]
        return min(idle)[1] if idle else None


class _HubCollector(Collector):
    """Reads the hub's counters into metric families at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        hub = metrics.hub

        yield _gauge("tinymq_info", "The server's version.", 1, version=__version__)
        yield _gauge(
            "tinymq_start_time_seconds",
            "When the server started, in seconds since the epoch.",
            hub.started,
        )

        counts, subscriptions = connection_counts(hub)
        connections = GaugeMetricFamily(
            "tinymq_connections",
            "Open subscriber connections, by protocol.",
            labels=["protocol"],
        )
        for protocol, count in counts.items():
            connections.add_metric([protocol], count)
        yield connections
        yield _gauge(
            "tinymq_subscriptions",
            "Topics and patterns followed, over all connections.",
            subscriptions,
        )
        yield _gauge(
            "tinymq_paused_subscribers",
            "Subscribers whose connection cannot take data now.",
            len(hub.paused),
        )
        yield _gauge(
            "tinymq_backlog_bytes",
            "Bytes of payload held for paused subscribers.",
            backlog_bytes(hub),
        )

        yield from self._counters(hub)
        yield self._latency()

        yield _gauge("tinymq_topics", "Topics the server knows.", len(hub.topics))
        yield _gauge(
            "tinymq_history_messages",
            "Messages kept in history, over all topics.",
            history_messages(hub),
        )
        yield _gauge(
            "tinymq_history_bytes",
            "Bytes of payload kept in history, over all topics.",
            hub.stats()["history_bytes"],  # type: ignore[arg-type]
        )
        yield from self._per_topic(hub)

    def _counters(self, hub: Hub) -> Iterator[Metric]:
        for name, documentation, value in (
            (
                "tinymq_messages_published",
                "Messages published.",
                hub.published,
            ),
            (
                "tinymq_messages_delivered",
                "Messages written or handed to subscribers, one per subscriber.",
                hub.delivered,
            ),
            (
                "tinymq_messages_skipped",
                "Messages a subscriber never got because a newer one "
                "replaced it (policy 'latest' or max_rate).",
                hub.skipped,
            ),
            (
                "tinymq_clients_dropped",
                "Subscribers disconnected by the slow-consumer policy or "
                "the stall timeout.",
                hub.dropped,
            ),
        ):
            yield CounterMetricFamily(name, documentation, value=value)

    def _latency(self) -> Metric:
        latency = self.metrics.latency
        return HistogramMetricFamily(
            "tinymq_delivery_latency_seconds",
            "Time from publish to the write to subscribers, per message and "
            "group write.",
            buckets=latency.cumulative(),
            sum_value=latency.sum,
        )

    def _per_topic(self, hub: Hub) -> Iterator[Metric]:
        series, (other_published, other_subscribers) = self.metrics.topics.collect(hub)
        published = CounterMetricFamily(
            "tinymq_topic_messages_published",
            "Messages published per topic, for the most active topics; "
            f"'{OTHER}' sums the rest.",
            labels=["topic"],
        )
        subscribers = GaugeMetricFamily(
            "tinymq_topic_subscribers",
            "Subscribers per topic, for the most active topics; "
            f"'{OTHER}' sums the rest.",
            labels=["topic"],
        )
        for name, count, followers in series:
            published.add_metric([name], count)
            subscribers.add_metric([name], followers)
        published.add_metric([OTHER], other_published)
        subscribers.add_metric([OTHER], other_subscribers)
        yield published
        yield subscribers


def _gauge(name: str, documentation: str, value: float, **labels: str) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class ServerMetrics:
    """The Prometheus metrics of one server, with a registry of its own."""

    def __init__(self, hub: Hub, topics: int) -> None:
        self.hub = hub
        self.latency = LatencyHistogram()
        self.topics = TopicSeries(topics)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HubCollector(self))
        ProcessCollector(registry=self.registry)

        self._chained = hub.on_delivery
        hub.on_delivery = self.on_delivery

    def on_delivery(self, messages: list[Message], subscriber_count: int) -> None:
        """Time one group write: one observation per message written."""
        now = self.hub.clock.seconds()  # type: ignore[misc]
        counts = self.latency.counts
        bounds = self.latency.bounds
        total = 0.0
        for message in messages:
            age = now - message.time
            counts[bisect_left(bounds, age)] += 1
            total += age
        self.latency.sum += total
        chained: Callable[[list[Message], int], None] | None = self._chained
        if chained is not None:
            chained(messages, subscriber_count)

    def render(self, accept: bytes | None) -> tuple[bytes, str]:
        """
        Return the exposition for a scrape that sent C{accept}, and its
        content type.
        """
        header = accept.decode("latin-1") if accept else ""
        encoder, content_type = choose_encoder(header)
        return encoder(self.registry), content_type
