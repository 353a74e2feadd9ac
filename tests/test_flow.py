"""
Unit tests of flow control: subscribers as push producers, the bounded
backlog, the slow-consumer policies, max_rate, the stall timeout and the
heartbeat, message by message on a fake clock.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.interfaces import IPushProducer
from zope.interface.verify import verifyObject

from tinymq._hub import Hub, Message
from tinymq._sse import SSEStream
from tinymq._wire import http_chunk, sse_event

from .helpers import (
    RecordingSubscriber,
    WriteCountingTransport,
    connect,
    dechunk,
    get_request,
    make_hub,
    make_site,
    parse_sse,
    split_response,
)


def frame(message: Message) -> bytes:
    """The SSE bytes of one message on a single-topic stream."""
    return sse_event(message.payload, str(message.id))


def publish(hub: Hub, topic: str, payload: bytes) -> Message:
    """Publish one message and end the reactor turn."""
    message = hub.publish(topic, payload)
    hub.flush()
    return message


def open_stream(hub: Hub, path: bytes) -> tuple[SSEStream, WriteCountingTransport]:
    """Open an SSE stream over a real HTTP channel; skip the opening bytes."""
    _, transport = connect(make_site(hub))
    transport.writes.clear()

    transport.producer.dataReceived(get_request(path))

    (stream,) = hub.subscribers
    assert isinstance(stream, SSEStream)
    head, body = split_response(transport.value())
    assert head.startswith(b"HTTP/1.1 200 ")
    assert dechunk(body) == b":ok\n\nretry: 2000\n\n"
    transport.clear()
    transport.writes.clear()
    return stream, transport


# Producers


def test_subscribers_are_push_producers() -> None:
    """Both the base subscriber and an SSE stream provide IPushProducer."""
    _, hub = make_hub()

    stream, _ = open_stream(hub, b"/api/topics/a/sse")

    assert verifyObject(IPushProducer, RecordingSubscriber(hub))
    assert verifyObject(IPushProducer, stream)


def test_transport_pauses_and_resumes_stream() -> None:
    """The connection's transport pauses and resumes the SSE stream."""
    _, hub = make_hub()
    stream, transport = open_stream(hub, b"/api/topics/a/sse")

    transport.producer.pauseProducing()
    paused = (stream.paused, list(hub.paused))
    transport.producer.resumeProducing()

    assert transport.streaming is True
    assert paused == (True, [stream])
    assert stream.paused is False
    assert hub.paused == {}


# Backlog


def test_paused_subscriber_holds_messages_in_order() -> None:
    """While paused nothing is written; resuming writes all held, in order."""
    _, hub = make_hub()
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a", "b"])
    subscriber.pauseProducing()

    held = []
    for topic, payload in [("a", b"1"), ("b", b"22"), ("a", b"333")]:
        held.append(publish(hub, topic, payload))
        assert subscriber.written == []
        assert subscriber._held == held
        assert subscriber.held_bytes == sum(len(m.payload) for m in held)
    subscriber.resumeProducing()
    live = publish(hub, "a", b"live")

    assert subscriber.written == [b"".join(map(frame, held)), frame(live)]
    assert subscriber.held_bytes == 0


def test_paused_stream_resumes_with_one_write() -> None:
    """An SSE stream writes nothing while paused, then one chunk in order."""
    _, hub = make_hub()
    stream, transport = open_stream(hub, b"/api/topics/a/sse")
    transport.producer.pauseProducing()

    held = []
    for index in range(3):
        held.append(publish(hub, "a", b"%d" % index))
        assert transport.writes == []
    transport.producer.resumeProducing()

    assert transport.writes == [http_chunk(b"".join(map(frame, held)))]
    events, _ = parse_sse([dechunk(transport.value())])
    assert [e.data for e in events] == ["0", "1", "2"]


def test_backlog_message_limit_disconnects() -> None:
    """One message over backlog_messages calls overflow once and is counted."""
    _, hub = make_hub(backlog_messages=3, slow_policy="disconnect")
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a"])
    subscriber.pauseProducing()

    for index in range(3):
        publish(hub, "a", b"%d" % index)
    within_limit = list(subscriber.calls)
    publish(hub, "a", b"3")
    publish(hub, "a", b"4")

    assert within_limit == []
    assert subscriber.calls == [("overflow", None), ("abort", "backlog-full")]
    assert hub.dropped == 1
    assert subscriber.closed is True
    assert hub.subscribers == set()
    assert hub.paused == {}
    assert hub._groups == {}


def test_backlog_byte_limit_disconnects() -> None:
    """Held payload bytes over backlog_bytes call overflow once."""
    _, hub = make_hub(backlog_bytes=10, slow_policy="disconnect")
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a"])
    subscriber.pauseProducing()

    publish(hub, "a", b"1234")
    publish(hub, "a", b"5678")
    within_limit = (list(subscriber.calls), subscriber.held_bytes)
    publish(hub, "a", b"9abc")

    assert within_limit == ([], 8)
    assert subscriber.count("overflow") == 1
    assert hub.dropped == 1
    assert subscriber.held_bytes == 0


def test_overflow_during_delivery_spares_other_groups() -> None:
    """A slow subscriber cut off mid-delivery leaves the others' delivery whole."""
    _, hub = make_hub(backlog_messages=1, slow_policy="disconnect")
    slow = RecordingSubscriber(hub, chunked=True)
    others = [RecordingSubscriber(hub), RecordingSubscriber(hub, fmt="ws")]
    hub.attach(slow, ["a"])
    for other in others:
        hub.attach(other, ["a"])
    slow.pauseProducing()
    publish(hub, "a", b"held")

    last = hub.publish("a", b"over the limit")
    hub.flush()

    assert slow.count("overflow") == 1
    assert others[0].written[-1] == frame(last)
    assert others[1].written[-1] == last.wire("ws")
    assert len(hub._groups) == 2
    assert hub.subscribers == set(others)


def test_stream_overflow_ends_response() -> None:
    """The disconnect policy ends an SSE response and closes the connection."""
    clock, hub = make_hub(backlog_messages=1, stall_timeout=30.0)
    stream, transport = open_stream(hub, b"/api/topics/a/sse")
    transport.producer.pauseProducing()

    publish(hub, "a", b"1")
    publish(hub, "a", b"2")
    ended = (transport.value(), transport.disconnecting, transport.disconnected)
    clock.advance(30)

    assert ended == (b"0\r\n\r\n", True, False)
    assert transport.disconnected is True
    assert stream.closed is True
    assert hub.subscribers == set()
    assert hub.dropped == 1


# The 'latest' policy


def test_latest_keeps_newest_per_topic() -> None:
    """A paused 'latest' subscriber holds only each topic's newest message."""
    _, hub = make_hub(slow_policy="latest")
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a", "b"])
    subscriber.pauseProducing()

    a1 = publish(hub, "a", b"a1")
    b1 = publish(hub, "b", b"b1")
    a2 = publish(hub, "a", b"a2")
    a3 = publish(hub, "a", b"a3")
    b2 = publish(hub, "b", b"b2")
    held = sorted(subscriber._latest.values(), key=lambda m: m.id)
    subscriber.resumeProducing()

    assert a1.id < b1.id < a2.id < a3.id < b2.id
    assert held == [a3, b2]
    assert subscriber.calls == [
        ("skipped", 3),
        ("write", frame(a3) + frame(b2)),
    ]
    assert hub.skipped == 3
    assert subscriber.skipped == 0
    assert hub.dropped == 0


def test_latest_client_choice_on_sse() -> None:
    """policy=latest on a stream sends a skipped event, then newest values."""
    _, hub = make_hub(slow_policy="disconnect")
    stream, transport = open_stream(hub, b"/api/sse?topic=a&topic=b&policy=latest")
    transport.producer.pauseProducing()

    sent = {}
    for topic, value in [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]:
        sent[topic] = publish(hub, topic, b'{"v": %d}' % value)
        assert transport.writes == []
    transport.producer.resumeProducing()

    events, _ = parse_sse([dechunk(transport.value())])
    b2, a3 = str(sent["b"].id), str(sent["a"].id)
    assert stream.policy == "latest"
    assert [(e.type, e.last_event_id, json.loads(e.data)) for e in events] == [
        ("skipped", "", {"skipped": 3}),
        ("message", b2, {"type": "message", "topic": "b", "id": b2, "data": {"v": 2}}),
        ("message", a3, {"type": "message", "topic": "a", "id": a3, "data": {"v": 3}}),
    ]
    assert len(transport.writes) == 2


# max_rate


def test_max_rate_coalesces_to_newest() -> None:
    """At 2/s, 10 publishes in 1 s give the first, then the newest per tick."""
    clock, hub = make_hub()
    subscriber = RecordingSubscriber(hub, max_rate=2.0)
    hub.attach(subscriber, ["a"])
    # Exact binary fractions, so that no publish falls on a 0.5 s tick.
    publish_times = [index * 0.09375 for index in range(10)]
    timeline = sorted(
        [(t, "publish") for t in publish_times]
        + [(t, "look") for t in (0.5, 1.0, 1.5, 5.0)]
    )

    messages = []
    seen: list[tuple[float, int]] = []
    for when, action in timeline:
        clock.advance(when - clock.seconds())
        if action == "publish":
            messages.append(publish(hub, "a", b"%d" % len(messages)))
        seen.append((when, len(subscriber.written)))

    assert subscriber.written == [
        frame(messages[0]),
        frame(messages[5]),
        frame(messages[9]),
    ]
    assert seen == [(t, 1) for t in publish_times[:6]] + [
        (0.5, 2),
        *[(t, 2) for t in publish_times[6:]],
        (1.0, 3),
        (1.5, 3),
        (5.0, 3),
    ]
    assert hub.skipped == 7
    assert clock.getDelayedCalls() == []


def test_max_rate_is_per_topic_and_per_group() -> None:
    """Rate-limited subscribers share one group; topics are limited apart."""
    _, hub = make_hub()
    limited = [RecordingSubscriber(hub, max_rate=1.0) for _ in range(2)]
    free = RecordingSubscriber(hub)
    for subscriber in [*limited, free]:
        hub.attach(subscriber, ["a", "b"])

    a1 = hub.publish("a", b"a1")
    b1 = hub.publish("b", b"b1")
    a2 = hub.publish("a", b"a2")
    hub.flush()

    assert limited[0].group is limited[1].group is not free.group
    assert limited[0].written == [frame(a1) + frame(b1)]
    assert limited[0].written[0] is limited[1].written[0]
    assert free.written == [frame(a1) + frame(b1) + frame(a2)]


def test_detach_cancels_rate_timer() -> None:
    """A rate-limited group that empties leaves no timer behind."""
    clock, hub = make_hub()
    subscriber = RecordingSubscriber(hub, max_rate=1.0)
    hub.attach(subscriber, ["a"])
    publish(hub, "a", b"1")
    publish(hub, "a", b"2")
    pending = len(clock.getDelayedCalls())

    hub.detach(subscriber)

    assert pending == 1
    assert clock.getDelayedCalls() == []
    assert hub._groups == {}


# Stalls


def test_stalled_subscriber_aborted_at_tick() -> None:
    """Paused longer than stall_timeout, a subscriber is aborted at the tick."""
    clock, hub = make_hub(stall_timeout=5.0, heartbeat=0)
    stalled = RecordingSubscriber(hub)
    recovered = RecordingSubscriber(hub)
    hub.attach(stalled, ["a"])
    hub.attach(recovered, ["a"])
    hub.start()
    stalled.pauseProducing()
    recovered.pauseProducing()

    clock.advance(3)
    recovered.resumeProducing()
    clock.advance(2)
    at_limit = list(stalled.calls)
    clock.advance(1)

    assert at_limit == []
    assert stalled.calls == [("abort", "stalled")]
    assert recovered.calls == []
    assert hub.dropped == 1
    assert hub.subscribers == {recovered}
    assert hub.paused == {}
    hub.stop()


def test_stalled_stream_connection_aborted() -> None:
    """A stalled SSE stream's TCP connection is aborted, not closed politely."""
    clock, hub = make_hub(stall_timeout=2.0, heartbeat=0)
    stream, transport = open_stream(hub, b"/api/topics/a/sse")
    hub.start()
    transport.producer.pauseProducing()

    clock.advance(3)

    assert transport.disconnected is True
    assert stream.closed is True
    assert hub.subscribers == set()
    hub.stop()


# Heartbeat


def test_heartbeat_only_to_unpaused_sse() -> None:
    """The heartbeat comment goes to SSE subscribers that are not paused."""
    clock, hub = make_hub(heartbeat=15.0, stall_timeout=0)
    plain = RecordingSubscriber(hub)
    chunked = RecordingSubscriber(hub, chunked=True)
    paused = RecordingSubscriber(hub)
    websocket = RecordingSubscriber(hub, fmt="ws")
    for subscriber in (plain, chunked, paused, websocket):
        hub.attach(subscriber, ["a"])
    paused.pauseProducing()
    hub.start()

    clock.advance(14.5)
    early = [list(s.written) for s in (plain, chunked, paused, websocket)]
    clock.advance(0.5)

    assert early == [[], [], [], []]
    assert plain.written == [b":\n\n"]
    assert chunked.written == [b"3\r\n:\n\n\r\n"]
    assert paused.written == []
    assert websocket.written == []
    hub.stop()


def test_heartbeat_on_stream() -> None:
    """An idle SSE stream receives one chunked comment per heartbeat."""
    clock, hub = make_hub(heartbeat=15.0, stall_timeout=0)
    _, transport = open_stream(hub, b"/api/topics/a/sse")
    hub.start()

    clock.advance(15)
    clock.advance(15)

    assert transport.writes == [b"3\r\n:\n\n\r\n", b"3\r\n:\n\n\r\n"]
    hub.stop()


@pytest.mark.parametrize("policy", ["disconnect", "latest"])
def test_stop_producing_leaves_hub(policy: str) -> None:
    """stopProducing from the transport removes the subscriber entirely."""
    _, hub = make_hub(slow_policy=policy)
    subscriber = RecordingSubscriber(hub)
    hub.attach(subscriber, ["a", "b.>"])
    subscriber.pauseProducing()
    publish(hub, "a", b"held")

    subscriber.stopProducing()
    subscriber.pauseProducing()
    subscriber.resumeProducing()
    publish(hub, "a", b"after")

    assert subscriber.calls == []
    assert hub.subscribers == set()
    assert hub.paused == {}
    assert hub._groups == {}


def test_replay_to_a_rate_limited_subscriber_is_the_newest_per_topic() -> None:
    """
    A subscriber with max_rate asking for history gets the newest message of
    each topic, in id order, not a burst; the rest counts as skipped.
    """
    _, hub = make_hub()
    for topic, payload in [("a", b"a1"), ("b", b"b1"), ("a", b"a2"), ("a", b"a3")]:
        hub.publish(topic, payload)
    hub.flush()
    subscriber = RecordingSubscriber(hub, max_rate=1)

    hub.attach(subscriber, ["a", "b"], last=5)

    events = parse_sse(subscriber.written)[0]
    assert [event.data for event in events] == ["b1", "a3"]
    assert hub.skipped == 2
