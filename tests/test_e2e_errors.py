"""
End-to-end tests of every error a client can meet on a real broker: the
status, and a JSON body with a stable code.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytest_twisted

from tests.conftest import Broker
from tests.e2e import (
    assert_error,
    http_request,
    open_sse,
    open_ws,
    publish,
    read_until_closed,
    request,
    wait_until,
)

pytestmark = pytest.mark.e2e

ALLOWED = "http://allowed.example"
LIMIT = 1000


@pytest.fixture(scope="module")
def strict(module_broker_factory: Callable[..., Broker]) -> Broker:
    """A broker with a 1000-byte message limit and one allowed origin."""
    return module_broker_factory(
        "--max-message-size", str(LIMIT), "--cors-origins", ALLOWED
    )


BAD_PUBLISHES = [
    ("bad$topic", b"{}", "application/json", "topic-invalid"),
    ("a..b", b"{}", "application/json", "topic-invalid"),
    ("x" * 256, b"{}", "application/json", "topic-invalid"),
    ("dashboard.*", b"{}", "application/json", "topic-invalid"),
    ("dashboard.%3E", b"{}", "application/json", "topic-invalid"),
    ("errors.empty", b"", "application/json", "payload-invalid"),
    ("errors.empty", b"", "text/plain", "payload-invalid"),
    ("errors.utf8", b"caf\xe9", "text/plain", "payload-invalid"),
    ("errors.utf8", b"\xff\xfe{}", "application/json", "payload-invalid"),
    ("errors.json", b'{"cpu": ', "application/json", "payload-invalid"),
    ("errors.json", b"NaN", "application/json", "payload-invalid"),
    ("errors.json", b"{bad}", "application/json; charset=utf-8", "payload-invalid"),
    ("errors.json", b"{bad}", "application/vnd.api+json", "payload-invalid"),
]


@pytest.mark.parametrize("topic, body, content_type, code", BAD_PUBLISHES)
@pytest_twisted.ensureDeferred
async def test_bad_publish_is_400(
    broker: Broker, topic: str, body: bytes, content_type: str, code: str
) -> None:
    """A bad topic or body is refused with 400 and the error's code."""
    reply = await publish(broker.base_url, topic, body, content_type)

    assert_error(reply, 400, code)


@pytest_twisted.ensureDeferred
async def test_text_that_is_not_json_is_published_as_text(broker: Broker) -> None:
    """The body refused as JSON is published when it does not claim to be."""
    reply = await publish(broker.base_url, "errors.json", b"{bad}", "text/plain")

    assert reply.status == 200
    assert reply.json() == {"id": reply.json()["id"], "topic": "errors.json"}


@pytest.mark.parametrize(
    "path", ["/api/topics/bad$/sse", "/api/topics/a.>.b/sse", "/api/sse"]
)
@pytest_twisted.ensureDeferred
async def test_bad_sse_request_is_400(broker: Broker, path: str) -> None:
    """An SSE stream of a bad pattern, or of no topic, is refused with 400."""
    reply = await request("GET", broker.base_url + path)

    assert_error(reply, 400, "bad-request" if path == "/api/sse" else "topic-invalid")


@pytest_twisted.ensureDeferred
async def test_websocket_of_a_bad_pattern_is_refused(broker: Broker) -> None:
    """A WebSocket of a bad pattern is refused with 400 at the handshake."""
    client = await open_ws(broker.port, "/api/topics/bad$/ws")

    assert client.status == 400
    assert client.frames == []


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/nope"),
        ("GET", "/api/topics/errors.never.published"),
        ("GET", "/api/topics/a/b/c"),
        ("POST", "/api"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_path_or_topic_is_404(
    broker: Broker, method: str, path: str
) -> None:
    """A path that serves nothing, or a topic never published, is 404."""
    reply = await request(method, broker.base_url + path, b"{}")

    assert_error(reply, 404, "not-found")


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("DELETE", "/api/topics/errors.topic", "GET, HEAD, OPTIONS, POST"),
        ("PUT", "/healthz", "GET, HEAD, OPTIONS"),
        ("POST", "/api/topics/errors.topic/sse", "GET, HEAD, OPTIONS"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(
    broker: Broker, method: str, path: str, allow: str
) -> None:
    """A method a path does not take is 405, with the methods it takes."""
    reply = await request(method, broker.base_url + path, b"{}")

    assert_error(reply, 405, "method-not-allowed")
    assert reply.header("allow") == [allow]


@pytest_twisted.ensureDeferred
async def test_413_is_decided_from_content_length_before_the_body(
    strict: Broker,
) -> None:
    """Headers announcing a huge body get 413 at once; no body byte is sent."""
    head = http_request(
        "POST",
        "/api/topics/errors.big",
        strict.port,
        {
            "Content-Type": "application/json",
            "Content-Length": str(10**9),
            "Origin": ALLOWED,
        },
    )

    stream = await read_until_closed(strict.port, head)

    assert stream.raw.startswith(b"HTTP/1.1 413 ")
    assert_error(stream, 413, "payload-too-large")
    assert stream.headers["access-control-allow-origin"] == [ALLOWED]
    assert stream.complete is True


@pytest_twisted.ensureDeferred
async def test_413_comes_without_100_continue(strict: Broker) -> None:
    """A client that waits for 100 Continue gets the 413 instead."""
    head = http_request(
        "POST",
        "/api/topics/errors.big",
        strict.port,
        {"Content-Length": str(LIMIT + 1), "Expect": "100-continue"},
    )

    stream = await read_until_closed(strict.port, head)

    assert stream.raw.startswith(b"HTTP/1.1 413 ")
    assert_error(stream, 413, "payload-too-large")


@pytest.mark.parametrize("size, status", [(LIMIT, 200), (LIMIT + 1, 413)])
@pytest_twisted.ensureDeferred
async def test_size_limit_is_exact(strict: Broker, size: int, status: int) -> None:
    """A body of exactly the limit is taken; one byte more is 413."""
    reply = await publish(strict.base_url, "errors.size", b"x" * size, "text/plain")

    if status == 200:
        assert (reply.status, reply.json()["topic"]) == (200, "errors.size")
    else:
        assert_error(reply, 413, "payload-too-large")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest_twisted.ensureDeferred
async def test_413_for_a_chunked_body_that_crosses_the_limit(strict: Broker) -> None:
    """A chunked body is cut off with 413 once it crosses the limit."""
    head = http_request(
        "POST",
        "/api/topics/errors.chunked",
        strict.port,
        {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"},
    )

    # No last chunk: the answer must not wait for the end of the body.
    stream = await read_until_closed(
        strict.port, head + _chunk(b"a" * 600) + _chunk(b"b" * 600)
    )

    assert stream.raw.startswith(b"HTTP/1.1 413 ")
    assert_error(stream, 413, "payload-too-large")


@pytest_twisted.ensureDeferred
async def test_chunked_body_under_the_limit_is_published(strict: Broker) -> None:
    """A chunked body within the limit is published whole."""
    listener = await open_sse(strict.port, "/api/topics/errors.chunked.ok/sse")
    head = http_request(
        "POST",
        "/api/topics/errors.chunked.ok",
        strict.port,
        {
            "Content-Type": "text/plain",
            "Transfer-Encoding": "chunked",
            "Connection": "close",
        },
    )

    stream = await read_until_closed(
        strict.port, head + _chunk(b"a" * 500) + _chunk(b"b" * 500) + b"0\r\n\r\n"
    )
    await wait_until(lambda: listener.events, "the message")
    listener.abort()

    assert stream.status == 200
    assert listener.data() == ["a" * 500 + "b" * 500]


@pytest.mark.parametrize("path", ["/ws", "/api/topics/errors.origin/ws"])
@pytest.mark.parametrize(
    "origin, status",
    [("http://evil.example", 403), (ALLOWED, 101), (None, 101)],
)
@pytest_twisted.ensureDeferred
async def test_websocket_origin_is_checked(
    strict: Broker, path: str, origin: str | None, status: int
) -> None:
    """A WebSocket from a disallowed Origin is refused; allowed or none open."""
    client = await open_ws(strict.port, path, origin)
    client.abort()

    assert client.status == status
    assert client.protocol_errors == []


@pytest_twisted.ensureDeferred
async def test_preflight_of_an_allowed_origin(strict: Broker) -> None:
    """A preflight from an allowed origin is answered with its CORS headers."""
    reply = await request(
        "OPTIONS",
        f"{strict.base_url}/api/topics/errors.cors",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert reply.status == 204
    assert reply.header("access-control-allow-origin") == [ALLOWED]
    assert reply.header("vary") == ["Origin"]
    assert reply.header("access-control-allow-methods") == ["GET, POST, OPTIONS"]
    assert reply.header("access-control-allow-headers") == [
        "Content-Type, Authorization, Last-Event-ID, Cache-Control"
    ]
    assert reply.header("access-control-max-age") == ["600"]
    assert reply.body == b""


@pytest_twisted.ensureDeferred
async def test_preflight_of_a_disallowed_origin_is_403(strict: Broker) -> None:
    """A preflight from another origin is refused with 403 and no CORS header."""
    reply = await request(
        "OPTIONS",
        f"{strict.base_url}/api/topics/errors.cors",
        headers={
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
        },
    )

    assert_error(reply, 403, "forbidden")
    assert reply.header("access-control-allow-origin") == []


@pytest_twisted.ensureDeferred
async def test_default_broker_allows_any_origin(broker: Broker) -> None:
    """With the default settings, any origin may publish and preflight."""
    preflight = await request(
        "OPTIONS",
        f"{broker.base_url}/api/topics/errors.cors",
        headers={
            "Origin": "http://any.example",
            "Access-Control-Request-Method": "POST",
        },
    )
    posted = await request(
        "POST",
        f"{broker.base_url}/api/topics/errors.cors",
        b"{}",
        {"Origin": "http://any.example", "Content-Type": "application/json"},
    )

    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == ["*"]
    assert posted.status == 200
    assert posted.header("access-control-allow-origin") == ["*"]


@pytest_twisted.ensureDeferred
async def test_cors_headers_on_publish_and_stream(strict: Broker) -> None:
    """Responses to an allowed origin carry CORS headers; others do not."""
    stream = await open_sse(
        strict.port, "/api/topics/errors.cors/sse", {"Origin": ALLOWED}
    )
    stream.abort()
    allowed = await request(
        "POST", f"{strict.base_url}/api/topics/errors.cors", b"1", {"Origin": ALLOWED}
    )
    other = await request(
        "POST",
        f"{strict.base_url}/api/topics/errors.cors",
        b"1",
        {"Origin": "http://evil.example"},
    )

    assert stream.headers["access-control-allow-origin"] == [ALLOWED]
    assert allowed.header("access-control-allow-origin") == [ALLOWED]
    assert other.header("access-control-allow-origin") == []


@pytest.mark.parametrize(
    "path, frame, code",
    [
        ("/api/topics/errors.wsclose/ws", b"binary", 1003),
        ("/api/topics/errors.wsclose/ws", " \n", 1007),
        ("/api/topics/errors.*/ws", '{"to": "a pattern"}', 1008),
    ],
)
@pytest_twisted.ensureDeferred
async def test_topic_websocket_closes_on_a_frame_it_cannot_publish(
    broker: Broker, path: str, frame: str | bytes, code: int
) -> None:
    """A frame C{/api/topics/<t>/ws} cannot publish closes it with a code."""
    before = broker.log_size()
    client = await open_ws(broker.port, path)

    if isinstance(frame, bytes):
        client.send_binary(frame)
    else:
        client.send_text(frame)
    await wait_until(lambda: client.closed, "the server to close")

    assert client.status == 101
    assert client.close_code == code
    assert client.close_reason != ""
    assert client.protocol_errors == []
    assert "Traceback" not in broker.log(since=before)


@pytest_twisted.ensureDeferred
async def test_closed_websockets_leave_the_connection_count(
    broker_factory: Callable[..., Broker],
) -> None:
    """A WebSocket that closed no longer counts against --max-connections."""
    small = broker_factory("--max-connections", "3")
    closed = []
    for _ in range(3):
        client = await open_ws(small.port, "/api/topics/errors.count/ws")
        client.close()
        await wait_until(lambda c=client: c.closed, "the WebSocket to close")
        closed.append(client.close_code)

    reply = await request("GET", f"{small.base_url}/healthz")

    assert closed == [1000, 1000, 1000]
    assert (reply.status, reply.json()) == (200, {"status": "ok"})
