"""
Edge cases of the WebSocket close codes, HEAD on a stream and the history
endpoint's limit, each the behaviour docs/ describes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted

from tests.conftest import Broker
from tests.e2e import OP_TEXT, open_ws, publish, wait_until

from .helpers import connect, make_hub, make_site, split_response


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_oversized_websocket_frame_closes_with_1009(
    broker_factory: Callable[..., Broker],
) -> None:
    """A frame over --max-message-size gets a close frame with code 1009."""
    small = broker_factory("--max-message-size", "1000")
    client = await open_ws(small.port, "/api/topics/edge.big/ws")

    client.send_text("a" * 1001)
    await wait_until(lambda: client.closed, "the server to close")

    assert client.status == 101
    assert client.close_code == 1009


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_invalid_utf8_text_frame_closes_with_1007(broker: Broker) -> None:
    """A text frame that is not UTF-8 gets a close frame with code 1007."""
    client = await open_ws(broker.port, "/api/topics/edge.utf8/ws")

    client._send(OP_TEXT, b"\xff\xfe")
    await wait_until(lambda: client.closed, "the server to close")

    assert client.status == 101
    assert client.close_code == 1007


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_topic_websocket_publish_over_topic_limit_closes_with_1013(
    broker_factory: Callable[..., Broker],
) -> None:
    """A per-topic publish past --max-topics closes with 1013, no traceback."""
    small = broker_factory("--max-topics", "1")
    await publish(small.base_url, "edge.first", "x", "text/plain")
    client = await open_ws(small.port, "/api/topics/edge.second/ws")
    before = small.log_size()

    client.send_text("hello")
    await wait_until(lambda: client.closed, "the server to close")

    assert client.close_code == 1013
    assert "Traceback" not in small.log(since=before)


def test_head_of_a_stream_has_no_body() -> None:
    """A HEAD of an SSE URL is answered with headers only, then nothing."""
    _, hub = make_hub()
    protocol, transport = connect(make_site(hub))

    protocol.dataReceived(b"HEAD /api/topics/edge/sse HTTP/1.1\r\nHost: t\r\n\r\n")
    hub.publish("edge", b"hello")
    hub.flush()

    head, body = split_response(transport.value())
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == b""
    assert hub.subscriber_count("edge") == 0


@pytest.mark.parametrize("since", [None, "0"])
def test_history_limit_zero_returns_no_message(since: str | None) -> None:
    """limit=0 on the history endpoint returns no message, not all of them."""
    _, hub = make_hub()
    for n in range(3):
        hub.publish("edge", b"%d" % n)

    found = hub.messages("edge", since, 0)

    assert found == []
