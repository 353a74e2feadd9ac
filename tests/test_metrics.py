"""
Observability: the Prometheus metrics at /metrics, the access log and the
JSON log format.

The metrics tests publish and subscribe, then check that the exposition
parses with prometheus_client's own parser and that each series moved by
exactly what the test did: unit tests over StubTreq with a real hub on a
fake clock, and one end-to-end run against twistd.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, capturedLogs
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from tests.conftest import Broker
from tests.e2e import (
    open_sse,
    open_ws,
    publish,
    request,
    sleep,
    wait_until,
    ws_command,
)
from tinymq._http import API
from tinymq._logging import (
    JSONLogObserver,
    combined_line,
    event_as_json,
    json_log_observer,
    use_json_log,
)
from tinymq._metrics import LATENCY_BUCKETS, ServerMetrics
from tinymq._site import Root

from .helpers import RecordingSubscriber, make_hub, make_site, result_of

URL = "http://tinymq.test"

SERIES = {
    "tinymq_info": "gauge",
    "tinymq_start_time_seconds": "gauge",
    "tinymq_connections": "gauge",
    "tinymq_subscriptions": "gauge",
    "tinymq_paused_subscribers": "gauge",
    "tinymq_backlog_bytes": "gauge",
    "tinymq_messages_published": "counter",
    "tinymq_messages_delivered": "counter",
    "tinymq_messages_skipped": "counter",
    "tinymq_clients_dropped": "counter",
    "tinymq_delivery_latency_seconds": "histogram",
    "tinymq_topics": "gauge",
    "tinymq_history_messages": "gauge",
    "tinymq_history_bytes": "gauge",
    "tinymq_topic_messages_published": "counter",
    "tinymq_topic_subscribers": "gauge",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Parse an exposition: the type of each family, and every sample."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value."""
    return samples[(name, frozenset(labels.items()))]


def topic_series(samples: Samples, name: str) -> dict[str, float]:
    """Return a per-topic family as a map from topic to value."""
    return {
        dict(labels)["topic"]: number
        for (sample, labels), number in samples.items()
        if sample == name
    }


class Server:
    """A StubTreq client over the real resource tree, a real hub, a fake clock."""

    def __init__(self, **settings: Any) -> None:
        self.clock, self.hub = make_hub(**settings)
        self.api = API(self.hub, self.hub.config)
        self.stub = StubTreq(Root(self.api.app.resource(), self.hub.config))

    def get(self, path: str, **headers: str) -> tuple[int, Any, bytes]:
        """Send a GET; return the status, the headers and the body."""
        sent = {name.replace("_", "-"): value for name, value in headers.items()}
        response = self._wait(self.stub.get(URL + path, headers=sent))
        return response.code, response.headers, self._wait(response.content())

    def publish(self, topic: str, body: bytes) -> None:
        """POST C{body} to C{topic} and check that it was taken."""
        response = self._wait(self.stub.post(f"{URL}/api/topics/{topic}", data=body))
        assert response.code == 200

    def open_sse(self, path: str) -> list[bytes]:
        """Open an SSE stream; return the list its body bytes go to."""
        response = self._wait(self.stub.get(URL + path))
        assert response.code == 200
        chunks: list[bytes] = []
        treq.collect(response, chunks.append)
        self.stub.flush()
        return chunks

    def scrape(self) -> Samples:
        """GET /metrics and parse it."""
        status, _, body = self.get("/metrics")
        assert status == 200
        return parse(body.decode("utf-8"))[1]

    def _wait(self, deferred: Any) -> Any:
        self.stub.flush()
        return result_of(deferred)


# The exposition


def test_every_documented_series_is_exposed() -> None:
    """/metrics parses and holds each documented family with its type."""
    server = Server()

    status, headers, body = server.get("/metrics")
    types, samples = parse(body.decode("utf-8"))

    assert status == 200
    assert headers.getRawHeaders("content-type") == [
        "text/plain; version=0.0.4; charset=utf-8"
    ]
    assert {n: t for n, t in types.items() if n.startswith("tinymq_")} == SERIES
    assert value(samples, "tinymq_info", version="0.1.0") == 1
    assert value(samples, "tinymq_start_time_seconds") == server.hub.started
    assert "process_resident_memory_bytes" in types


def test_openmetrics_when_asked() -> None:
    """A scraper that asks for OpenMetrics gets that format."""
    server = Server()

    _, headers, body = server.get("/metrics", Accept="application/openmetrics-text")

    assert headers.getRawHeaders("content-type") == [
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    ]
    assert body.endswith(b"# EOF\n")


def test_metrics_off() -> None:
    """With metrics off, /metrics is a JSON 404 and no delivery hook is set."""
    server = Server(metrics=False)

    status, headers, body = server.get("/metrics")

    assert status == 404
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body)["error"] == "not-found"
    assert server.hub.on_delivery is None


def test_registry_is_private() -> None:
    """Each server counts in its own registry, never in the global one."""
    first, second = Server(), Server()

    first.publish("a", b"1")
    first.publish("a", b"2")
    second.publish("a", b"3")

    assert value(first.scrape(), "tinymq_messages_published_total") == 2
    assert value(second.scrape(), "tinymq_messages_published_total") == 1
    assert prometheus_client.REGISTRY.get_sample_value("tinymq_topics") is None


# Counters


def test_counters_move_by_publishes_and_deliveries() -> None:
    """Three subscribers and four publishes move each series by exactly that."""
    server = Server()
    before = server.scrape()
    raw = server.open_sse("/api/topics/a/sse")
    enveloped = server.open_sse("/api/sse?topic=a")
    websocket = RecordingSubscriber(server.hub, fmt="ws")
    server.hub.attach(websocket, ["a"])
    payloads = [b'{"n": 1}', b'{"n": 22}', b'{"n": 333}', b"text"]

    for payload in payloads[:3]:
        server.publish("a", payload)
    server.publish("b", payloads[3])
    server.clock.advance(0.3)
    server.stub.flush()
    after = server.scrape()

    assert value(before, "tinymq_messages_published_total") == 0
    assert value(after, "tinymq_messages_published_total") == 4
    assert value(after, "tinymq_messages_delivered_total") == 9
    assert value(after, "tinymq_connections", protocol="sse") == 2
    assert value(after, "tinymq_connections", protocol="ws") == 1
    assert value(after, "tinymq_subscriptions") == 3
    assert value(after, "tinymq_topics") == 2
    assert value(after, "tinymq_history_messages") == 4
    assert value(after, "tinymq_history_bytes") == sum(map(len, payloads))
    assert topic_series(after, "tinymq_topic_messages_published_total") == {
        "a": 3,
        "b": 1,
        "_other": 0,
    }
    assert topic_series(after, "tinymq_topic_subscribers") == {
        "a": 3,
        "b": 0,
        "_other": 0,
    }
    assert len(websocket.written) == 1
    assert b"".join(raw).count(b"data: ") == 3
    assert b"".join(enveloped).count(b"data: ") == 3


def test_latency_histogram() -> None:
    """Each message of each group write is one observation of its age."""
    server = Server()
    server.hub.attach(RecordingSubscriber(server.hub), ["a"])
    server.hub.attach(RecordingSubscriber(server.hub, fmt="ws"), ["a"])

    server.publish("a", b"1")
    server.clock.advance(0.002)
    server.publish("a", b"2")
    server.publish("a", b"3")
    server.clock.advance(0.7)
    samples = server.scrape()

    buckets = {
        dict(labels)["le"]: number
        for (name, labels), number in samples.items()
        if name == "tinymq_delivery_latency_seconds_bucket"
    }
    assert buckets == {
        **{repr(bound): 0 for bound in LATENCY_BUCKETS if bound < 0.0025},
        **{repr(bound): 2 for bound in LATENCY_BUCKETS if 0.0025 <= bound < 1},
        **{repr(bound): 6 for bound in LATENCY_BUCKETS if bound >= 1},
        "+Inf": 6,
    }
    assert value(samples, "tinymq_delivery_latency_seconds_count") == 6
    assert value(samples, "tinymq_delivery_latency_seconds_sum") == pytest.approx(
        2 * 0.002 + 4 * 0.7
    )


def test_skipped_and_backlog_of_a_paused_subscriber() -> None:
    """
    A paused 'latest' subscriber holds one message and skips the rest; only
    what reaches its transport on resume counts as delivered.
    """
    server = Server()
    subscriber = RecordingSubscriber(server.hub, policy="latest")
    server.hub.attach(subscriber, ["a"])
    subscriber.pauseProducing()

    for payload in (b"one", b"two", b"three!"):
        server.publish("a", payload)
    server.hub.flush()
    paused = server.scrape()
    subscriber.resumeProducing()
    resumed = server.scrape()

    assert value(paused, "tinymq_messages_skipped_total") == 2
    assert value(paused, "tinymq_paused_subscribers") == 1
    assert value(paused, "tinymq_backlog_bytes") == len(b"three!")
    assert value(paused, "tinymq_messages_delivered_total") == 0
    assert value(resumed, "tinymq_messages_delivered_total") == 1
    assert value(resumed, "tinymq_paused_subscribers") == 0
    assert value(resumed, "tinymq_backlog_bytes") == 0


def test_dropped_client() -> None:
    """A paused subscriber whose backlog overflows is counted as dropped."""
    server = Server(backlog_messages=2)
    subscriber = RecordingSubscriber(server.hub)
    server.hub.attach(subscriber, ["a"])
    subscriber.pauseProducing()

    for payload in (b"1", b"2", b"3"):
        server.publish("a", payload)
    server.hub.flush()
    samples = server.scrape()

    assert subscriber.count("overflow") == 1
    assert value(samples, "tinymq_clients_dropped_total") == 1
    assert value(samples, "tinymq_connections", protocol="sse") == 0
    assert value(samples, "tinymq_paused_subscribers") == 0
    assert value(samples, "tinymq_backlog_bytes") == 0


def test_delivery_hook_is_chained() -> None:
    """A delivery hook set before the metrics still gets every call."""
    clock, hub = make_hub()
    calls: list[tuple[list[str], int]] = []
    hub.on_delivery = lambda messages, count: calls.append(
        ([m.topic for m in messages], count)
    )
    metrics = ServerMetrics(hub, 10)
    hub.attach(RecordingSubscriber(hub), ["a"])

    hub.publish("a", b"1")
    hub.flush()

    assert calls == [(["a"], 1)]
    assert metrics.latency.counts[0] == 1


# Per-topic series


def test_topic_series_are_bounded() -> None:
    """Only the most active topics get series; '_other' sums the rest."""
    server = Server(metrics_topics=2)

    for topic, count in (("t1", 3), ("t2", 2), ("t3", 1), ("t4", 1)):
        for number in range(count):
            server.publish(topic, b"%d" % number)
    samples = server.scrape()

    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "t1": 3,
        "t2": 2,
        "_other": 2,
    }
    assert topic_series(samples, "tinymq_topic_subscribers") == {
        "t1": 0,
        "t2": 0,
        "_other": 0,
    }


def test_topic_series_stay_monotonic() -> None:
    """A busier topic takes an idle topic's series; no counter goes down."""
    server = Server(metrics_topics=1)
    for _ in range(2):
        server.publish("x", b"x")
    first = server.scrape()
    for _ in range(5):
        server.publish("y", b"y")
    second = server.scrape()

    server.hub.attach(RecordingSubscriber(server.hub), ["y"])
    server.publish("y", b"y")
    third = server.scrape()

    published = "tinymq_topic_messages_published_total"
    assert topic_series(first, published) == {"x": 2, "_other": 0}
    assert topic_series(second, published) == {"x": 2, "_other": 5}
    assert topic_series(third, published) == {"y": 3, "_other": 5}
    assert topic_series(third, "tinymq_topic_subscribers") == {"y": 1, "_other": 0}
    assert value(third, "tinymq_messages_published_total") == 8


def test_busy_topics_keep_their_series() -> None:
    """A topic with subscribers keeps its series when others get busier."""
    server = Server(metrics_topics=1)
    server.hub.attach(RecordingSubscriber(server.hub), ["quiet"])
    server.publish("quiet", b"1")
    server.scrape()

    for _ in range(3):
        server.publish("loud", b"2")
    server.hub.start()
    server.clock.advance(1.0)
    samples = server.scrape()

    assert server.hub.topics["loud"].rate == 3.0
    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "quiet": 1,
        "_other": 3,
    }


def test_idle_topic_gives_its_series_to_a_busy_one() -> None:
    """A topic whose rate decayed under 0.01/s gives its place to a busy one."""
    server = Server(metrics_topics=1)
    server.hub.start()
    server.publish("old", b"1")
    server.clock.advance(1.0)
    first = server.scrape()

    for _ in range(20):
        server.clock.advance(1.0)
    server.publish("new", b"2")
    server.publish("new", b"3")
    server.clock.advance(1.0)
    second = server.scrape()

    published = "tinymq_topic_messages_published_total"
    assert topic_series(first, published) == {"old": 1, "_other": 0}
    assert server.hub.topics["old"].rate < 0.01
    assert topic_series(second, published) == {"new": 2, "_other": 1}


def test_followed_topic_goes_before_an_idle_one() -> None:
    """A followed topic gets the place before an idle one with a higher rate."""
    server = Server(metrics_topics=1)
    server.publish("fading", b"1")
    server.publish("followed", b"2")
    server.hub.attach(RecordingSubscriber(server.hub), ["followed"])

    server.hub.topics["fading"].rate = 0.005
    samples = server.scrape()

    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "followed": 1,
        "_other": 1,
    }


def test_no_topic_series() -> None:
    """With --metrics-topics 0, every topic is summed under '_other'."""
    server = Server(metrics_topics=0)
    server.hub.attach(RecordingSubscriber(server.hub), ["a"])

    server.publish("a", b"1")
    server.publish("b", b"2")
    samples = server.scrape()

    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "_other": 2
    }
    assert topic_series(samples, "tinymq_topic_subscribers") == {"_other": 1}


def test_topic_named_other_is_summed() -> None:
    """A topic that is itself called '_other' never gets a series of its own."""
    server = Server()

    server.publish("_other", b"1")
    server.publish("a", b"2")
    samples = server.scrape()

    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "a": 1,
        "_other": 1,
    }


def test_forgotten_topic_moves_to_other() -> None:
    """A topic the hub forgets leaves its count under '_other'."""
    server = Server(history_size=0)
    server.publish("gone", b"1")
    server.publish("gone", b"2")
    server.scrape()

    server.hub._forget_idle_topics()
    samples = server.scrape()

    assert "gone" not in server.hub.topics
    assert topic_series(samples, "tinymq_topic_messages_published_total") == {
        "_other": 2
    }


# End to end


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_metrics_of_a_real_broker(broker: Broker) -> None:
    """Against twistd, real SSE and WebSocket clients move the series exactly."""
    topic = "metrics.e2e"

    async def scrape() -> Samples:
        reply = await request("GET", f"{broker.base_url}/metrics")
        assert reply.status == 200
        return parse(reply.body.decode("utf-8"))[1]

    before = await scrape()
    sse = await open_sse(broker.port, f"/api/topics/{topic}/sse")
    commands = await open_ws(broker.port, "/ws")
    assert await ws_command(commands, {"type": "subscribe", "topic": topic}) == {
        "type": "subscribed",
        "topic": topic,
    }
    raw = await open_ws(broker.port, f"/api/topics/{topic}/ws")
    await wait_until(lambda: raw.status == 101, "the WebSocket handshake")
    subscribed = await scrape()

    replies = [await publish(broker.base_url, topic, f'{{"n": {n}}}') for n in range(4)]
    await wait_until(
        lambda: (
            len(sse.data()) == 4
            and len(raw.messages) == 4
            and len(commands.messages) == 5
        ),
        "four messages on every client",
    )
    published = await scrape()
    for client in (sse, commands, raw):
        client.abort()
    after = await scrape()
    for _ in range(200):
        if value(after, "tinymq_subscriptions") == value(
            before, "tinymq_subscriptions"
        ):
            break
        await sleep(0.05)
        after = await scrape()

    def moved(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    assert [r.status for r in replies] == [200] * 4
    assert moved(subscribed, "tinymq_connections", protocol="sse") == 1
    assert moved(subscribed, "tinymq_connections", protocol="ws") == 2
    assert moved(subscribed, "tinymq_subscriptions") == 3
    assert moved(published, "tinymq_messages_published_total") == 4
    assert moved(published, "tinymq_messages_delivered_total") == 12
    assert moved(published, "tinymq_delivery_latency_seconds_count") == 12
    assert moved(published, "tinymq_history_messages") == 4
    assert topic_series(published, "tinymq_topic_messages_published_total")[topic] == 4
    assert topic_series(published, "tinymq_topic_subscribers")[topic] == 3
    assert moved(after, "tinymq_subscriptions") == 0
    assert moved(after, "tinymq_connections", protocol="sse") == 0
    assert moved(after, "tinymq_connections", protocol="ws") == 0


def urllib_opener() -> urllib.request.OpenerDirector:
    """A urllib opener that uses no proxy: the broker is on 127.0.0.1."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


# The access log

REQUEST = (
    b"GET /healthz?token=s3cret&x=1 HTTP/1.1\r\n"
    b"Host: tinymq.test\r\n"
    b"Referer: http://app.test/page?token=s3cret\r\n"
    b'User-Agent: a "quoted" agent\r\n'
    b"\r\n"
)


def access_events(**settings: Any) -> tuple[list[dict[str, Any]], bytes]:
    """Serve REQUEST on a real channel; return the access events and reply."""
    _, hub = make_hub(**settings)
    site = make_site(hub)
    protocol = site.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))

    with capturedLogs() as events:
        protocol.makeConnection(transport)
        protocol.dataReceived(REQUEST)

    found = [dict(e) for e in events if e.get("log_namespace") == "tinymq.access"]
    return found, transport.value()


def test_access_log_is_off_by_default() -> None:
    """Without --access-log, a request logs nothing in tinymq.access."""

    events, reply = access_events()

    assert reply.startswith(b"HTTP/1.1 200 ")
    assert events == []


def test_access_log_line() -> None:
    """With --access-log, a request logs its combined-format fields, token hidden."""

    events, _ = access_events(access_log=True)

    (event,) = events
    fields = {k: v for k, v in event.items() if not k.startswith("log_")}
    assert fields == {
        "peer": "127.0.0.1",
        "method": "GET",
        "uri": "/healthz?token=***&x=1",
        "protocol": "HTTP/1.1",
        "status": 200,
        "size": 16,
        "referrer": "http://app.test/page?token=***",
        "agent": 'a "quoted" agent',
    }
    when, line = event["log_text"].split("] ", 1)
    assert re.fullmatch(
        r"127\.0\.0\.1 - - \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000", when
    )
    assert line == (
        '"GET /healthz?token=***&x=1 HTTP/1.1" 200 16 '
        '"http://app.test/page?token=***" "a \\x22quoted\\x22 agent"'
    )
    assert "s3cret" not in repr(event)


def test_combined_line_escapes() -> None:
    """Quotes, backslashes, controls and non-ASCII cannot break a log line."""
    fields = {
        "peer": "::1",
        "method": "GET",
        "uri": '/a"b\\c\nd',
        "protocol": "HTTP/1.0",
        "status": 404,
        "size": 0,
        "referrer": "-",
        "agent": "caf\u00e9\x7f",
    }

    line = combined_line(fields, 0)

    assert line == (
        '::1 - - [01/Jan/1970:00:00:00 +0000] "GET /a\\x22b\\x5cc\\x0ad HTTP/1.0" '
        '404 - "-" "caf\\xe9\\x7f"'
    )


# JSON logs


class _Shown:
    def __repr__(self) -> str:
        return "<shown>"


def test_event_as_json() -> None:
    """An event becomes one JSON object: time, level, namespace, message, fields."""
    events: list[Any] = []
    log = Logger(namespace="tinymq.test", observer=events.append)

    log.warn("Hello {who}", who="world", data=b"\xff", obj=_Shown(), n=[1, (2,)])
    record = json.loads(event_as_json(events[0]))

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record.pop("time"))
    assert record == {
        "level": "warn",
        "namespace": "tinymq.test",
        "message": "Hello world",
        "who": "world",
        "data": "\\xff",
        "obj": "<shown>",
        "n": [1, [2]],
    }


def test_event_as_json_with_failure() -> None:
    """A logged failure carries its traceback in 'failure'."""
    events: list[Any] = []
    log = Logger(namespace="tinymq.test", observer=events.append)

    try:
        raise ValueError("bad input")
    except ValueError:
        log.failure("It broke")
    record = json.loads(event_as_json(events[0]))

    assert record["level"] == "critical"
    assert record["message"] == "It broke"
    assert record["failure"].splitlines()[-1] == "builtins.ValueError: bad input"


def test_json_observer_writes_one_line_per_event() -> None:
    """The observer writes each event as one line that parses as JSON."""
    output = io.StringIO()
    log = Logger(namespace="tinymq.test", observer=JSONLogObserver(output))

    log.info("first\nline")
    log.info("second")

    lines = output.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first\nline", "second"]


@pytest.mark.parametrize(
    ("options", "logfile"),
    [
        ({"nodaemon": True, "logfile": None}, None),
        ({"nodaemon": True, "logfile": "-"}, None),
        ({"nodaemon": False, "logfile": None}, "twistd.log"),
        ({"nodaemon": True, "logfile": "broker.log"}, "broker.log"),
    ],
)
def test_json_log_goes_where_twistd_logs(
    options: dict[str, Any], logfile: str | None, tmp_path: Path, monkeypatch: Any
) -> None:
    """The JSON log goes to stdout or to the file twistd would log to."""
    monkeypatch.chdir(tmp_path)
    server_options: dict[str, Any] = {"logger": None, **options}

    use_json_log(server_options)
    observer = json_log_observer()

    assert server_options["logger"] == "tinymq._logging.json_log_observer"
    if logfile is None:
        assert observer.output is sys.stdout
    else:
        assert isinstance(observer.output, LogFile)
        assert observer.output.path == str(tmp_path / logfile)
        observer.output.close()


def test_json_log_leaves_an_explicit_logger() -> None:
    """twistd's own --logger wins over --log-format json."""
    server_options = {"logger": "my.logger", "nodaemon": True, "logfile": None}

    use_json_log(server_options)

    assert server_options["logger"] == "my.logger"


def test_twistd_options_choose_the_json_log() -> None:
    """`twistd -n tinymq --log-format json` makes twistd use the JSON observer."""
    options = ServerOptions()

    options.parseOptions(["-n", "--pidfile=", "tinymq", "--log-format", "json"])

    assert options["logger"] is json_log_observer


def test_twistd_options_keep_text_logs_by_default() -> None:
    """Without --log-format, twistd keeps its own text log."""
    options = ServerOptions()

    options.parseOptions(["-n", "--pidfile=", "tinymq"])

    assert options["logger"] is None


@pytest.mark.e2e
def test_json_access_log_of_a_real_broker(broker_factory: Any) -> None:
    """twistd logs only JSON lines, with one access record per request."""
    broker = broker_factory("--log-format", "json", "--access-log", "true")

    with urllib_opener().open(f"{broker.base_url}/healthz?token=abc123") as reply:
        assert reply.status == 200
    deadline = 200
    while "tinymq.access" not in broker.log() and deadline:
        deadline -= 1
        time.sleep(0.05)
    log = broker.log()

    records = [json.loads(line) for line in log.splitlines()]
    (access,) = [r for r in records if r["namespace"] == "tinymq.access"]
    assert access["uri"] == "/healthz?token=***"
    assert access["status"] == 200
    assert access["method"] == "GET"
    assert access["level"] == "info"
    assert "abc123" not in log
    assert any(
        r["message"] == f"TinyMQ 0.1.0 listening on 127.0.0.1:{broker.port}"
        for r in records
    )
