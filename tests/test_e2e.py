"""
End-to-end tests: a real C{twistd -n tinymq} on 127.0.0.1, publishing with
treq, receiving over SSE and WebSocket on real sockets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred, gatherResults

from tests.conftest import Broker
from tests.e2e import (
    HTTPStream,
    SSEBody,
    WebSocketClient,
    open_sse,
    open_ws,
    publish,
    request,
    wait_until,
    ws_command,
)

pytestmark = pytest.mark.e2e


async def _open_many(count: int, batch: int, opener: Callable[[], Any]) -> list[Any]:
    """Open C{count} clients, C{batch} at a time (the listen backlog is small)."""
    clients: list[Any] = []
    while len(clients) < count:
        size = min(batch, count - len(clients))
        clients += await gatherResults([ensureDeferred(opener()) for _ in range(size)])
    return clients


@pytest_twisted.ensureDeferred
async def test_dashboard_metrics_reach_an_sse_subscriber(broker: Broker) -> None:
    """A worker's JSON metrics reach an SSE subscriber as the same object."""
    metrics = {"cpu_usage": 45, "ram_usage": 1024}
    response = await treq.get(
        f"{broker.base_url}/api/topics/dashboard.metrics/sse",
        headers={"Accept": ["text/event-stream"]},
        unbuffered=True,
        persistent=False,
    )
    body = SSEBody()
    response.deliverBody(body)
    await wait_until(lambda: body.parser.retry is not None, "the opening bytes")
    opening = (list(body.parser.comments), body.parser.retry, list(body.events))

    reply = await publish(broker.base_url, "dashboard.metrics", json.dumps(metrics))
    await wait_until(lambda: body.events, "the metrics event")
    body.stop()

    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert response.headers.getRawHeaders("cache-control") == ["no-cache"]
    assert response.headers.getRawHeaders("x-accel-buffering") == ["no"]
    assert opening == (["ok"], 2000, [])
    assert reply.status == 200
    assert reply.json() == {"id": reply.json()["id"], "topic": "dashboard.metrics"}
    assert reply.json()["id"].isdigit()
    assert [(e.type, e.last_event_id) for e in body.events] == [
        ("message", reply.json()["id"])
    ]
    assert json.loads(body.events[0].data) == metrics


@pytest_twisted.ensureDeferred
async def test_fan_out_to_200_sse_and_50_websocket_subscribers(
    broker: Broker,
) -> None:
    """250 subscribers of both protocols get all 100 messages once, in order."""
    topic = "fanout.prices"
    streams: list[HTTPStream] = await _open_many(
        200, 50, lambda: open_sse(broker.port, f"/api/topics/{topic}/sse")
    )
    sockets: list[WebSocketClient] = await _open_many(
        50, 50, lambda: open_ws(broker.port, f"/api/topics/{topic}/ws")
    )
    # Lengths that take 7-bit and 16-bit WebSocket frame lengths.
    payloads = [json.dumps({"seq": n, "pad": "x" * (n * 3)}) for n in range(100)]

    ids = []
    for payload in payloads:
        reply = await publish(broker.base_url, topic, payload)
        ids.append(reply.json()["id"])
    # A last message: anything repeated would arrive before it.
    end = await publish(broker.base_url, topic, '"end"')
    await wait_until(
        lambda: (
            all(len(s.events) == 101 for s in streams)
            and all(len(w.messages) == 101 for w in sockets)
        ),
        "every subscriber to receive every message",
        timeout=15,
    )
    for client in streams + sockets:
        client.abort()

    assert [s.status for s in streams] == [200] * 200
    assert [w.status for w in sockets] == [101] * 50
    assert [int(i) for i in ids] == sorted({int(i) for i in ids})
    expected_events = list(
        zip(payloads + ['"end"'], ids + [end.json()["id"]], strict=True)
    )
    for stream in streams:
        assert [(e.data, e.last_event_id) for e in stream.events] == expected_events
    for socket in sockets:
        assert socket.messages == payloads + ['"end"']
        assert socket.protocol_errors == []


@pytest_twisted.ensureDeferred
async def test_a_large_message_reaches_sse_and_websocket_whole(
    broker: Broker,
) -> None:
    """A 200 kB message arrives whole: one SSE event, one 64-bit-length frame."""
    topic = "large.blob"
    stream = await open_sse(broker.port, f"/api/topics/{topic}/sse")
    socket = await open_ws(broker.port, f"/api/topics/{topic}/ws")
    payload = json.dumps({"blob": "y" * 200_000})

    reply = await publish(broker.base_url, topic, payload)
    await wait_until(
        lambda: stream.events and socket.messages, "the message on both streams"
    )
    stream.abort()
    socket.abort()

    assert [(e.data, e.last_event_id) for e in stream.events] == [
        (payload, reply.json()["id"])
    ]
    assert socket.messages == [payload]
    assert [(f.fin, f.opcode, len(f.payload)) for f in socket.frames] == [
        (True, 1, len(payload))
    ]
    assert socket.protocol_errors == []


@pytest_twisted.ensureDeferred
async def test_wildcard_sse_stream_carries_topics(broker: Broker) -> None:
    """An SSE stream of C{dashboard.>} gets envelopes of matching topics only."""
    stream = await open_sse(broker.port, "/api/topics/dashboard.%3E/sse")

    sent = [
        ("dashboard.metrics", '{"cpu_usage": 45}', "application/json"),
        ("other.metrics", '{"cpu_usage": 1}', "application/json"),
        ("dashboard", '{"cpu_usage": 2}', "application/json"),
        ("dashboard.cpu.core0", "plain text", "text/plain"),
        ("dashboard.end", "[]", "application/json"),
    ]
    ids = []
    for topic, body, content_type in sent:
        reply = await publish(broker.base_url, topic, body, content_type)
        ids.append(reply.json()["id"])
    await wait_until(lambda: len(stream.events) == 3, "three events")
    stream.abort()

    assert [json.loads(e.data) for e in stream.events] == [
        {
            "type": "message",
            "topic": "dashboard.metrics",
            "id": ids[0],
            "data": {"cpu_usage": 45},
        },
        {
            "type": "message",
            "topic": "dashboard.cpu.core0",
            "id": ids[3],
            "data": "plain text",
        },
        {"type": "message", "topic": "dashboard.end", "id": ids[4], "data": []},
    ]
    assert [e.last_event_id for e in stream.events] == [ids[0], ids[3], ids[4]]


@pytest_twisted.ensureDeferred
async def test_topic_websocket_carries_raw_payloads_both_ways(
    broker: Broker,
) -> None:
    """C{/api/topics/<t>/ws} sends raw payloads and publishes what it gets."""
    sender = await open_ws(broker.port, "/api/topics/wsraw.chat/ws")
    listener = await open_ws(broker.port, "/api/topics/wsraw.chat/ws")
    pattern = await open_ws(broker.port, "/api/topics/wsraw.*/ws")

    sender.send_text('{"from": "ws"}')
    await wait_until(lambda: listener.messages, "the frame the client sent")
    reply = await publish(broker.base_url, "wsraw.chat", "plain\ntext", "text/plain")
    await wait_until(lambda: len(pattern.messages) == 2, "two envelopes")
    await wait_until(lambda: len(sender.messages) == 2, "two frames")

    assert [sender.status, listener.status, pattern.status] == [101, 101, 101]
    assert sender.messages == ['{"from": "ws"}', "plain\ntext"]
    assert listener.messages == ['{"from": "ws"}', "plain\ntext"]
    first, second = pattern.json_messages()
    assert first == {
        "type": "message",
        "topic": "wsraw.chat",
        "id": first["id"],
        "data": {"from": "ws"},
    }
    assert second == {
        "type": "message",
        "topic": "wsraw.chat",
        "id": reply.json()["id"],
        "data": "plain\ntext",
    }
    assert int(first["id"]) < int(second["id"])


@pytest_twisted.ensureDeferred
async def test_topic_websocket_takes_a_percent_encoded_pattern(
    broker: Broker,
) -> None:
    """C{dashboard.%3E}, as a browser sends C{dashboard.>}, is the pattern."""
    client = await open_ws(broker.port, "/api/topics/wsenc.%3E/ws")

    reply = await publish(broker.base_url, "wsenc.metrics", '{"cpu": 1}')
    await wait_until(lambda: client.messages or client.closed, "the envelope")
    client.abort()

    assert client.status == 101
    assert client.json_messages() == [
        {
            "type": "message",
            "topic": "wsenc.metrics",
            "id": reply.json()["id"],
            "data": {"cpu": 1},
        }
    ]


@pytest_twisted.ensureDeferred
async def test_command_websocket_subscribe_publish_ping_unsubscribe(
    broker: Broker,
) -> None:
    """C{/ws} acknowledges each command and delivers a pattern's messages."""
    client = await open_ws(broker.port, "/ws")

    subscribed = await ws_command(
        client, {"type": "subscribe", "topic": "cmd.>", "ref": "s1"}
    )
    client.send_json(
        {"type": "publish", "topic": "cmd.metrics", "data": {"cpu": 45}, "ref": 2}
    )
    await wait_until(lambda: len(client.messages) == 3, "the ack and the message")
    published, delivered = client.json_messages()[1:3]
    reply = await publish(broker.base_url, "cmd.cpu.core0", '{"load": 0.5}')
    await wait_until(lambda: len(client.messages) == 4, "the posted message")
    pong = await ws_command(client, {"type": "ping", "ref": 3})
    unsubscribed = await ws_command(client, {"type": "unsubscribe", "topic": "cmd.>"})
    await publish(broker.base_url, "cmd.metrics", '{"cpu": 99}')
    after = await ws_command(client, {"type": "ping"})
    client.close()

    assert subscribed == {"type": "subscribed", "topic": "cmd.>", "ref": "s1"}
    assert published == {
        "type": "published",
        "topic": "cmd.metrics",
        "id": published["id"],
        "ref": 2,
    }
    assert delivered == {
        "type": "message",
        "topic": "cmd.metrics",
        "id": published["id"],
        "data": {"cpu": 45},
    }
    assert client.json_messages()[3] == {
        "type": "message",
        "topic": "cmd.cpu.core0",
        "id": reply.json()["id"],
        "data": {"load": 0.5},
    }
    assert pong == {"type": "pong", "ref": 3}
    assert unsubscribed == {"type": "unsubscribed", "topic": "cmd.>"}
    assert after == {"type": "pong"}
    assert len(client.messages) == 7


BAD_COMMANDS = [
    ("not json", "bad-request"),
    ("[1, 2]", "bad-request"),
    ('{"type": "dance", "ref": 7}', "bad-request"),
    ('{"type": "subscribe", "ref": 7}', "topic-invalid"),
    ('{"type": "subscribe", "topic": "bad topic!", "ref": 7}', "topic-invalid"),
    ('{"type": "subscribe", "topic": "a.b", "last": -1, "ref": 7}', "bad-request"),
    ('{"type": "publish", "topic": "a.*", "data": 1, "ref": 7}', "topic-invalid"),
    ('{"type": "publish", "topic": "a.b", "ref": 7}', "payload-invalid"),
    ('{"type": "unsubscribe", "topic": "never.followed", "ref": 7}', "bad-request"),
    (b"\x00binary", "bad-request"),
]


@pytest.mark.parametrize("command, code", BAD_COMMANDS)
@pytest_twisted.ensureDeferred
async def test_command_websocket_answers_bad_commands_with_errors(
    broker: Broker, command: str | bytes, code: str
) -> None:
    """A bad C{/ws} command gets an error frame and the connection lives on."""
    client = await open_ws(broker.port, "/ws")

    if isinstance(command, bytes):
        client.send_binary(command)
    else:
        client.send_text(command)
    await wait_until(lambda: client.messages, "the error frame")
    pong = await ws_command(client, {"type": "ping"})
    client.close()

    (error,) = client.json_messages()[:1]
    expected = {"type": "error", "error": code, "message": error["message"]}
    if '"ref"' in str(command):
        expected["ref"] = 7
    assert error == expected
    assert isinstance(error["message"], str) and error["message"] != ""
    assert pong == {"type": "pong"}
    assert client.close_code is None


@pytest_twisted.ensureDeferred
async def test_log_has_one_start_line_and_no_line_per_message(
    broker_factory: Callable[..., Broker],
) -> None:
    """The broker logs where it listens once, and nothing per message."""
    fresh = broker_factory()
    stream = await open_sse(fresh.port, "/api/topics/logged.topic/sse")
    socket = await open_ws(fresh.port, "/api/topics/logged.topic/ws")
    await request("GET", f"{fresh.base_url}/healthz")
    before = fresh.log_size()

    for n in range(100):
        await publish(fresh.base_url, "logged.topic", json.dumps({"n": n}))
    await wait_until(
        lambda: len(stream.events) == 100 and len(socket.messages) == 100,
        "the 100 messages",
    )
    health = await request("GET", f"{fresh.base_url}/healthz")
    new_lines = fresh.log(since=before)
    stream.abort()
    socket.abort()

    listening = [line for line in fresh.log().splitlines() if "listening on" in line]
    assert len(listening) == 1
    assert listening[0].endswith(f"listening on 127.0.0.1:{fresh.port}")
    assert health.json() == {"status": "ok"}
    assert new_lines == ""
    assert fresh.log_size() == before


@pytest_twisted.ensureDeferred
async def test_sse_splits_every_line_break_of_a_payload(broker: Broker) -> None:
    """A payload with CRLF, CR and LF breaks arrives whole, as one event."""
    stream = await open_sse(broker.port, "/api/topics/lines.check/sse")

    reply = await publish(broker.base_url, "lines.check", "a\r\nb\rc\nd", "text/plain")
    await wait_until(lambda: stream.events, "the event")
    stream.abort()

    assert [(e.type, e.data, e.last_event_id) for e in stream.events] == [
        ("message", "a\nb\nc\nd", reply.json()["id"])
    ]
    assert stream.sse.comments == ["ok"]
