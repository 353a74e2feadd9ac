"""
End-to-end tests of history and resume: C{Last-Event-ID} and
C{lastEventId} on SSE, the C{reset} signal, C{last=N}, the history routes,
and C{since} and C{last} on the C{/ws} protocol, against a real
C{twistd -n tinymq} on 127.0.0.1 and raw-socket clients.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Broker
from tests.rawclient import (
    Background,
    Closable,
    Publisher,
    SSEClient,
    SSEEvent,
    WSClient,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def resume_broker(module_broker_factory: Callable[..., Broker]) -> Broker:
    """A broker shared by this module's tests, keeping 10,000 per topic."""
    return module_broker_factory("--history-size", "10000")


def body(n: int) -> bytes:
    """The payload of message C{n}."""
    return b'{"n":%d}' % n


def seen(events: list[SSEEvent]) -> list[tuple[str, str | None, Any]]:
    """Return (type, id, data) of each event, the data parsed as JSON."""
    return [(e.type, e.id, e.json()) for e in events]


def envelope(topic: str, message_id: str, n: int) -> dict[str, Any]:
    """The JSON envelope of message C{n} on a stream of several topics."""
    return {"type": "message", "topic": topic, "id": message_id, "data": {"n": n}}


@pytest.mark.parametrize("carrier", ["header", "query"])
def test_a_client_that_reconnects_gets_exactly_what_it_missed(
    resume_broker: Broker, clients: list[Closable], carrier: str
) -> None:
    """
    A client that read 3 of 10 messages and reconnects after 5 more, with
    the last id it saw in C{Last-Event-ID} or C{lastEventId}, gets the 12 it
    missed in order, then live messages, and nothing else.
    """
    port, topic = resume_broker.port, f"resume.one.{carrier}"
    path = f"/api/topics/{topic}/sse"
    publisher = Publisher(port)
    clients.append(publisher)
    first = SSEClient(port, path)
    clients.append(first)
    ids = [publisher.post(topic, body(n)) for n in range(10)]
    first.read_until(lambda: len(first.events) >= 3, "three messages")
    last_seen = first.events[2].id
    assert last_seen is not None
    first.close()
    publisher.wait_for(lambda: publisher.subscribers(topic) == 0, "the end")

    ids += [publisher.post(topic, body(n)) for n in range(10, 15)]
    if carrier == "header":
        second = SSEClient(port, path, headers={"Last-Event-ID": last_seen})
    else:
        second = SSEClient(port, f"{path}?lastEventId={last_seen}")
    clients.append(second)
    second.read_until(lambda: len(second.events) >= 12, "the missed messages")
    ids += [publisher.post(topic, body(n)) for n in range(15, 17)]
    second.read_until(lambda: len(second.events) >= 14, "the live messages")

    assert last_seen == ids[2]
    assert seen(second.events) == [("message", ids[n], {"n": n}) for n in range(3, 17)]


class ContinuousPublisher(Background):
    """Publishes C{{"n": n}} to a topic without pause, from a thread."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__()
        self.publisher = Publisher(port)
        self.topic = topic
        self.ids: list[str] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ids.append(self.publisher.post(self.topic, body(len(self.ids))))

    def _finish(self) -> None:
        self.publisher.close()


def test_resume_races_publishing_without_gap_or_duplicate(
    resume_broker: Broker, clients: list[Closable]
) -> None:
    """
    A client cut off 20 times at random points (mid-event included, by FIN
    or RST) while messages are published without pause sees, over all its
    connections, every message exactly once and in order.
    """
    port, topic = resume_broker.port, "resume.race"
    path = f"/api/topics/{topic}/sse"
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    got: list[tuple[str | None, Any]] = []
    others: list[SSEEvent] = []
    last_id: str | None = None

    def connect() -> SSEClient:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        client = SSEClient(port, path, headers=headers)
        clients.append(client)
        return client

    client = connect()
    with ContinuousPublisher(port, topic) as publisher:
        for _ in range(20):
            wanted = rng.randrange(0, 60)
            while len(client.messages()) < wanted:
                client.pump(rng.randrange(1, 120))
            events = client.events
            got += [(e.id, e.json()["n"]) for e in events if e.type == "message"]
            others += [e for e in events if e.type != "message"]
            last_id = next((e.id for e in reversed(events) if e.id), last_id)
            if rng.random() < 0.5:
                client.vanish()
            else:
                client.close()
            time.sleep(rng.choice([0, 0, 0.001, 0.005, 0.02]))
            client = connect()
    ids = publisher.ids
    client.read_until(
        lambda: any(e.id == ids[-1] for e in client.events), "the last message"
    )
    got += [(e.id, e.json()["n"]) for e in client.messages()]
    others += [e for e in client.events if e.type != "message"]
    print(f"\nseed {seed}: {len(ids)} messages over 21 connections")

    assert others == []
    assert got == [(message_id, n) for n, message_id in enumerate(ids)]


def test_resume_across_several_topics_of_one_stream(
    resume_broker: Broker, clients: list[Closable]
) -> None:
    """
    A stream of C{topic=a&topic=b.>} resumed with one C{Last-Event-ID} gets
    exactly the missed messages of all its topics, in id order, each in an
    envelope naming its topic.
    """
    port = resume_broker.port
    path = "/api/sse?topic=multi.a&topic=multi.b.%3E"
    topics = ["multi.a", "multi.b.x", "multi.c", "multi.b", "multi.b.y.z"]
    followed = {"multi.a", "multi.b.x", "multi.b.y.z"}
    publisher = Publisher(port)
    clients.append(publisher)
    first = SSEClient(port, path)
    clients.append(first)
    sent = []
    for n in range(10):
        sent.append((topics[n % 5], publisher.post(topics[n % 5], body(n)), n))
    first.read_until(lambda: len(first.events) >= 3, "three messages")
    last_seen = first.events[2].id
    assert last_seen is not None
    first.close()

    for n in range(10, 20):
        sent.append((topics[n % 5], publisher.post(topics[n % 5], body(n)), n))
    second = SSEClient(port, path, headers={"Last-Event-ID": last_seen})
    clients.append(second)
    expected = [
        ("message", i, envelope(t, i, n))
        for t, i, n in sent
        if t in followed and int(i) > int(last_seen)
    ]
    second.read_until(lambda: len(second.events) >= len(expected), "missed ones")
    live = publisher.post("multi.b.live", body(20))
    second.read_until(lambda: len(second.events) > len(expected), "a live one")

    assert [e.id for e in first.events[:3]] == [sent[i][1] for i in (0, 1, 4)]
    assert last_seen == sent[4][1]
    assert len(expected) == 9
    assert seen(second.events) == expected + [
        ("message", live, envelope("multi.b.live", live, 20))
    ]


def test_ids_the_history_cannot_serve_get_a_reset(
    broker_factory: Callable[..., Broker],
    resume_broker: Broker,
    clients: list[Closable],
) -> None:
    """
    With 5 messages kept, a C{Last-Event-ID} older than history, from
    another server run or from the future is answered with a C{reset} event
    before live data (with C{last=2}, then the last 2), and the newest id
    that history still follows resumes without one; so does C{/ws}.
    """
    elsewhere = Publisher(resume_broker.port)
    clients.append(elsewhere)
    other_run = elsewhere.post("reset.elsewhere", body(0))
    broker = broker_factory("--history-size", "5")
    port, topic = broker.port, "reset.a"
    path = f"/api/topics/{topic}/sse"
    publisher = Publisher(port)
    clients.append(publisher)
    ids = [publisher.post(topic, body(n)) for n in range(10)]
    future = str(int(ids[-1]) + 1000)
    reset = ("reset", ids[-1], {"reason": "history-gap", "last_id": ids[-1]})

    streams = {
        "old": SSEClient(port, path, headers={"Last-Event-ID": ids[3]}),
        "other run": SSEClient(port, f"{path}?lastEventId={other_run}"),
        "future": SSEClient(port, path, headers={"Last-Event-ID": future}),
        "old, last=2": SSEClient(port, f"{path}?last=2&lastEventId={ids[0]}"),
        "kept": SSEClient(port, path, headers={"Last-Event-ID": ids[4]}),
    }
    command = WSClient(port, "/ws")
    clients += [*streams.values(), command]
    command.send_json({"type": "subscribe", "topic": topic, "since": ids[3]})
    command.read_until(lambda: len(command.messages) >= 2, "two replies")
    publisher.wait_for(lambda: publisher.subscribers(topic) == 6, "6 subscribers")
    live = publisher.post(topic, body(10))
    for stream in streams.values():
        stream.read_until(lambda s=stream: s.events and s.events[-1].id == live, "live")
    command.read_until(lambda: len(command.messages) == 3, "the live message")

    message = ("message", live, {"n": 10})
    assert {name: seen(s.events) for name, s in streams.items()} == {
        "old": [reset, message],
        "other run": [reset, message],
        "future": [reset, message],
        "old, last=2": [
            reset,
            ("message", ids[8], {"n": 8}),
            ("message", ids[9], {"n": 9}),
            message,
        ],
        "kept": [("message", ids[n], {"n": n}) for n in range(5, 10)] + [message],
    }
    assert command.json_messages() == [
        {"type": "subscribed", "topic": topic},
        {"type": "reset", "reason": "history-gap", "last_id": ids[-1]},
        {"type": "message", "topic": topic, "id": live, "data": {"n": 10}},
    ]


def test_last_n_gives_the_current_values_at_once(
    resume_broker: Broker, clients: list[Closable]
) -> None:
    """
    C{last=N} gives the last N messages of each topic at once, on SSE of a
    topic and of a pattern and on the topic WebSocket.
    """
    port = resume_broker.port
    publisher = Publisher(port)
    clients.append(publisher)
    sent = [("current.a", publisher.post("current.a", body(n)), n) for n in range(6)]
    sent += [("current.b", publisher.post("current.b", body(n)), n) for n in (6, 7)]
    sent += [("current.a", publisher.post("current.a", body(8)), 8)]
    ids = [i for _, i, _ in sent]

    single = SSEClient(port, "/api/topics/current.a/sse?last=3")
    pattern = SSEClient(port, "/api/topics/current.%3E/sse?last=2")
    socket = WSClient(port, "/api/topics/current.a/ws?last=3")
    clients += [single, pattern, socket]
    single.read_until(lambda: len(single.events) >= 3, "three messages")
    pattern.read_until(lambda: len(pattern.events) >= 4, "four messages")
    socket.read_until(lambda: len(socket.messages) >= 3, "three frames")
    live = publisher.post("current.a", body(9))
    single.read_until(lambda: len(single.events) >= 4, "the live message")
    pattern.read_until(lambda: len(pattern.events) >= 5, "the live message")
    socket.read_until(lambda: len(socket.messages) >= 4, "the live frame")

    assert seen(single.events) == [
        ("message", ids[4], {"n": 4}),
        ("message", ids[5], {"n": 5}),
        ("message", ids[8], {"n": 8}),
        ("message", live, {"n": 9}),
    ]
    assert seen(pattern.events) == [
        ("message", ids[n], envelope(topic, ids[n], n))
        for topic, n in [
            ("current.a", 5),
            ("current.b", 6),
            ("current.b", 7),
            ("current.a", 8),
        ]
    ] + [("message", live, envelope("current.a", live, 9))]
    assert socket.messages == ['{"n":4}', '{"n":5}', '{"n":8}', '{"n":9}']


def test_history_routes_return_the_last_message_and_slices(
    resume_broker: Broker, clients: list[Closable]
) -> None:
    """
    C{GET /api/topics/<t>} returns the last message, and
    C{GET /api/topics/<t>/messages} the slice after C{since}, up to
    C{limit}, or the last C{limit} messages without C{since}.
    """
    topic = "history.route"
    publisher = Publisher(resume_broker.port)
    clients.append(publisher)
    ids = [publisher.post(topic, body(n)) for n in range(8)]

    described = publisher.get(f"/api/topics/{topic}")
    sliced = publisher.get(f"/api/topics/{topic}/messages?since={ids[1]}&limit=3")
    tail = publisher.get(f"/api/topics/{topic}/messages?limit=2")
    after_last = publisher.get(f"/api/topics/{topic}/messages?since={ids[7]}")

    def listed(messages: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
        return [(m["id"], m["topic"], m["data"]) for m in messages]

    assert {k: described[k] for k in ("topic", "messages", "history", "last_id")} == {
        "topic": topic,
        "messages": 8,
        "history": 8,
        "last_id": ids[7],
    }
    assert listed([described["last_message"]]) == [(ids[7], topic, {"n": 7})]
    assert isinstance(described["last_message"]["time"], float)
    assert sliced["topic"] == topic
    assert listed(sliced["messages"]) == [(ids[n], topic, {"n": n}) for n in (2, 3, 4)]
    assert listed(tail["messages"]) == [(ids[n], topic, {"n": n}) for n in (6, 7)]
    assert after_last["messages"] == []
    assert (sliced["last_id"], tail["last_id"]) == (ids[7], ids[7])


def test_ws_protocol_resumes_with_since_and_sends_last(
    resume_broker: Broker, clients: list[Closable]
) -> None:
    """
    On C{/ws}, C{since} resumes exactly after that id, C{last} sends the
    last N of each topic, and every message frame names its topic and id.
    """
    port = resume_broker.port
    publisher = Publisher(port)
    clients.append(publisher)
    sent = [("wsr.a", publisher.post("wsr.a", body(n)), n) for n in range(6)]
    sent += [("wsr.b", publisher.post("wsr.b", body(n)), n) for n in (6, 7)]
    ids = [i for _, i, _ in sent]

    resumed = WSClient(port, "/ws")
    latest = WSClient(port, "/ws")
    clients += [resumed, latest]
    resumed.send_json(
        {"type": "subscribe", "topic": "wsr.a", "since": ids[2], "ref": "r1"}
    )
    latest.send_json({"type": "subscribe", "topic": "wsr.>", "last": 2})
    resumed.read_until(lambda: len(resumed.messages) >= 4, "three messages")
    latest.read_until(lambda: len(latest.messages) >= 5, "four messages")
    live = publisher.post("wsr.a", body(8))
    resumed.read_until(lambda: len(resumed.messages) >= 5, "the live message")
    latest.read_until(lambda: len(latest.messages) >= 6, "the live message")

    def message(topic: str, message_id: str, n: int) -> dict[str, Any]:
        return {"type": "message", "topic": topic, "id": message_id, "data": {"n": n}}

    assert resumed.json_messages() == [
        {"type": "subscribed", "topic": "wsr.a", "ref": "r1"},
        message("wsr.a", ids[3], 3),
        message("wsr.a", ids[4], 4),
        message("wsr.a", ids[5], 5),
        message("wsr.a", live, 8),
    ]
    assert latest.json_messages() == [
        {"type": "subscribed", "topic": "wsr.>"},
        message("wsr.a", ids[4], 4),
        message("wsr.a", ids[5], 5),
        message("wsr.b", ids[6], 6),
        message("wsr.b", ids[7], 7),
        message("wsr.a", live, 8),
    ]
